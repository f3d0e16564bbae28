"""Volume files (CT, MRI): NIfTI (.nii, .nii.gz) and folders of DICOM slices read into
``[C, D, H, W]`` in file voxel order with their geometry, hostile or broken ones refused in
one line, and NIfTI maps written back atomically. Every file is made here, in ``tmp_path``.
"""

import gzip
import io
import os
import random
import time
import warnings

import nibabel
import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from kql.catalog import volumes
from kql.results import nifti
from kql.errors import KqlExecutionError, KqlImageError
from test_scan_images import dicom_bytes

# i -> posterior (-y), j -> superior (+z), k -> right (+x): voxel sizes 2, 3, 4 mm.
PERMUTED = np.array([[0.0, 0.0, 4.0, -7.0], [-2.0, 0.0, 0.0, 5.0], [0.0, 3.0, 0.0, 11.0], [0, 0, 0, 1]])


def nifti_bytes(data, affine=PERMUTED, slope=None, inter=None) -> bytes:
    """A single-file NIfTI-1 of ``data``; ``slope``/``inter`` forged into the header."""
    raw = bytearray(nibabel.Nifti1Image(data, affine).to_bytes())
    header = nibabel.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
    if slope is not None:
        header["scl_slope"], header["scl_inter"] = slope, inter
    raw[:348] = header.binaryblock
    return bytes(raw)


def write(tmp_path, name, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return str(path)


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(KqlImageError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# -- NIfTI ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz", "named-wrongly.dat"])
def test_a_nifti_is_read_in_file_order_with_its_scaling_and_geometry(tmp_path, name):
    stored = np.random.default_rng(0).integers(-300, 300, (4, 5, 6)).astype(np.int16)
    data = nifti_bytes(stored, slope=2.0, inter=-5.0)
    path = write(tmp_path, name, gzip.compress(data) if name.endswith(".dat") else data)
    assert volumes.is_volume_path(path)
    loaded = volumes.read_volume(path)
    assert loaded.tensor.shape == (1, 4, 5, 6) and loaded.tensor.dtype == torch.float32
    np.testing.assert_array_equal(loaded.tensor[0].numpy(), stored * 2.0 - 5.0)
    info = loaded.info
    assert info["format"] == "NIfTI" and info["dtype"] == "int16" and info["shape"] == (4, 5, 6)
    np.testing.assert_allclose(info["affine"], PERMUTED)
    assert info["spacing"] == pytest.approx((2.0, 3.0, 4.0)) and info["orientation"] == "PSR"


def test_a_4d_nifti_gives_channels_first(tmp_path):
    data = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3)
    loaded = volumes.read_nifti(write(tmp_path, "c.nii.gz", nifti_bytes(data, np.eye(4))))
    assert loaded.tensor.shape == (3, 4, 5, 6) and loaded.info["orientation"] == "RAS"
    for c in range(3):
        assert torch.equal(loaded.tensor[c], torch.from_numpy(data[..., c]))
    vector = volumes.read_nifti(write(tmp_path, "v.nii", nifti_bytes(data[:, :, :, None], np.eye(4))))
    assert torch.equal(vector.tensor, loaded.tensor)      # x, y, z, 1, c: a vector field


def test_5d_data_is_refused(tmp_path):
    path = write(tmp_path, "five.nii", nifti_bytes(np.zeros((2, 2, 2, 2, 2), np.float32)))
    assert "5-D data (2x2x2x2x2)" in refused(volumes.read_nifti, path)


def forged_header(dims, dtype=np.int16) -> bytes:
    header = nibabel.Nifti1Image(np.zeros((2, 2, 2), dtype), np.eye(4)).header
    dim = header["dim"]
    dim[0], dim[1:len(dims) + 1] = len(dims), dims
    header["dim"], header["vox_offset"] = dim, 352
    return header.binaryblock + bytes(4) + bytes(64)


def test_a_nifti_gz_claiming_1e10_voxels_is_refused_before_inflating(tmp_path):
    path = write(tmp_path, "bomb.nii.gz", forged_header((2200, 2200, 2200)))
    assert os.path.getsize(path) < 200
    start = time.perf_counter()
    message = refused(volumes.read_volume, path)
    assert time.perf_counter() - start < 1.0
    assert "2200x2200x2200 = 10,648,000,000 voxels, more than max_image_pixels (64,000,000)" in message


def test_a_nifti_over_memory_limit_is_refused_before_inflating(tmp_path):
    path = write(tmp_path, "big.nii.gz", forged_header((100, 100, 100), np.float32))
    message = refused(volumes.read_nifti, path, memory_limit=1 << 20)
    assert "would take 19.1 MB in memory" in message and "memory_limit (1.0 MB)" in message


def test_a_nifti_gz_extension_claiming_more_than_its_offset_is_not_inflated(tmp_path):
    """nibabel reads an extension of the size it claims: the reader stops at the voxels' end."""
    import struct
    import tracemalloc

    header = nibabel.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)).header
    header["vox_offset"] = 368
    extension = struct.pack("<ii", 64 << 20, 4) + bytes(64 << 20)     # 64 MB of zeros
    path = write(tmp_path, "ext.nii.gz", header.binaryblock + b"\1\0\0\0" + extension)
    tracemalloc.start()
    try:
        assert "corrupt or truncated NIfTI" in refused(volumes.read_volume, path)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()
    header["vox_offset"] = 0        # voxels inside the header: nibabel would read it as data
    inside = write(tmp_path, "o.nii", header.binaryblock + bytes(20))
    assert "inside its header" in refused(volumes.read_volume, inside)


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_a_truncated_nifti_is_refused(tmp_path, name):
    whole = nifti_bytes(np.random.default_rng(2).random((16, 16, 16), np.float32))
    data = gzip.compress(whole) if name.endswith(".gz") else whole
    data = data[:len(data) // 2]         # the header whole, half the voxels
    path = tmp_path / name
    path.write_bytes(data)
    assert "corrupt or truncated NIfTI" in refused(volumes.read_volume, str(path))


def test_a_nifti_of_nan_is_refused(tmp_path):
    data = np.ones((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    assert "NaN or infinite" in refused(volumes.read_nifti, write(tmp_path, "n.nii", nifti_bytes(data)))


def test_files_that_are_no_volume_are_refused(tmp_path):
    png = write(tmp_path, "scan.nii", b"\x89PNG\r\n\x1a\n" + bytes(400))
    assert not volumes.is_volume_path(png)
    assert "neither NIfTI" in refused(volumes.read_volume, png)
    assert "not a NIfTI" in refused(volumes.read_nifti, png)
    assert "empty (0 bytes)" in refused(volumes.read_volume, write(tmp_path, "e.nii", b""))
    fifo = str(tmp_path / "pipe.nii")
    os.mkfifo(fifo)
    assert not volumes.is_volume_path(fifo)
    assert "FIFO" in refused(volumes.read_volume, fifo)


# -- DICOM series --------------------------------------------------------------------------------

SERIES = generate_uid()
AXIAL = [1, 0, 0, 0, 1, 0]


def slice_bytes(pixels, position, number, series=SERIES, orientation=AXIAL) -> bytes:
    """One CT slice of a series (test_scan_images' DICOM file with a series' geometry)."""
    elements = dict(SeriesInstanceUID=series, ImageOrientationPatient=orientation,
                    InstanceNumber=number, RescaleSlope=2, RescaleIntercept=-1024)
    if position is not None:
        elements["ImagePositionPatient"] = position
    return dicom_bytes(pixels, **elements)


def stack(count=5, rows=6, columns=7) -> np.ndarray:
    """Stored 12-bit values of ``count`` slices, each telling slice, row and column apart."""
    k, j, i = np.mgrid[0:count, 0:rows, 0:columns]
    return (100 * k + 10 * j + i).astype(np.uint16)


def series_folder(tmp_path, pixels, positions, numbers=None, **odd) -> str:
    """The slices written under shuffled names (name order is not slice order)."""
    folder = tmp_path / "series"
    folder.mkdir()
    names = [f"IM{n:04d}.dcm" for n in random.Random(3).sample(range(100), len(pixels))]
    for k, (plane, position) in enumerate(zip(pixels, positions)):
        extra = odd if k == 2 else {}
        data = slice_bytes(extra.pop("plane", plane), position, (numbers or range(1, 99))[k], **extra)
        (folder / names[k]).write_bytes(data)
    (folder / "README.txt").write_text("not a slice")
    return str(folder)


def test_a_dicom_series_is_sorted_rescaled_and_placed(tmp_path):
    pixels = stack()
    positions = [[-50.0, 20.0, -10.0 + 2.5 * k] for k in range(5)]
    order = [3, 0, 4, 1, 2]             # files in another order than their positions
    folder = series_folder(tmp_path, pixels[order], [positions[k] for k in order])
    assert volumes.is_volume_path(folder)
    loaded = volumes.read_volume(folder)
    t = loaded.tensor
    assert t.shape == (1, 7, 6, 5) and t.dtype == torch.float32
    for k in range(5):
        for j in range(6):
            for i in range(7):
                assert t[0, i, j, k] == pixels[k, j, i] * 2.0 - 1024.0
    info = loaded.info
    assert info["format"] == "DICOM series" and info["slices"] == 5 and info["modality"] == "CT"
    np.testing.assert_allclose(info["affine"], [[-0.75, 0, 0, 50], [0, -0.5, 0, -20],
                                                [0, 0, 2.5, -10], [0, 0, 0, 1]])
    assert info["spacing"] == pytest.approx((0.75, 0.5, 2.5)) and info["orientation"] == "LPS"
    assert info["shape"] == (7, 6, 5)


def test_volumes_match_monai_load_image(tmp_path):
    """Differential: MONAI's LoadImage gives the same voxels and affine, so a MONAI-trained
    model sees what it saw in training (its PydicomReader orders slices by InstanceNumber,
    here in step with the positions; a NIfTI's channels are last there)."""
    transforms = pytest.importorskip("monai.transforms")
    order = [3, 0, 4, 1, 2]
    folder = series_folder(tmp_path, stack()[order], [[-50.0, 20.0, -10.0 + 2.5 * k] for k in order],
                           numbers=[k + 1 for k in order])
    os.remove(os.path.join(folder, "README.txt"))       # MONAI reads every file of the folder
    stored = np.random.default_rng(0).integers(0, 100, (4, 5, 6, 3)).astype(np.int16)
    nifti = write(tmp_path, "a.nii.gz", nifti_bytes(stored, slope=2.0, inter=-5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [transforms.LoadImage(reader="PydicomReader", image_only=True)(folder),
                  transforms.LoadImage(reader="NibabelReader", image_only=True)(nifti)]
    for mine, image in zip((volumes.read_dicom_series(folder), volumes.read_nifti(nifti)), theirs):
        voxels = np.asarray(image)
        voxels = voxels[None] if voxels.ndim == 3 else np.moveaxis(voxels, -1, 0)
        np.testing.assert_array_equal(mine.tensor.numpy(), voxels)
        np.testing.assert_allclose(mine.info["affine"], np.asarray(image.affine), atol=1e-6)


def test_slices_are_sorted_along_their_normal_not_z(tmp_path):
    sagittal = [0, 1, 0, 0, 0, -1]      # normal: row x column = (-1, 0, 0)
    pixels = stack(count=3)
    positions = [[10.0, 0, 0], [4.0, 0, 0], [7.0, 0, 0]]    # along the normal: file 0, 2, 1
    folder = tmp_path / "sag"
    folder.mkdir()
    for k in range(3):
        (folder / f"{k}.dcm").write_bytes(slice_bytes(pixels[k], positions[k], k + 1, orientation=sagittal))
    loaded = volumes.read_dicom_series(str(folder))
    assert [float(loaded.tensor[0, 0, 0, k]) for k in range(3)] == [-1024.0, -624.0, -824.0]
    assert loaded.info["spacing"] == pytest.approx((0.75, 0.5, 3.0))
    affine = np.array(loaded.info["affine"])
    centre = affine @ [0, 0, 2, 1]      # the last slice (file 1): x = 4 mm, LPS -> RAS
    np.testing.assert_allclose(centre[:3], [-4.0, 0.0, 0.0])


def test_without_positions_instance_numbers_order_the_slices(tmp_path):
    pixels = stack(count=3)
    folder = series_folder(tmp_path, pixels[[2, 0, 1]], [None] * 3, numbers=[3, 1, 2])
    loaded = volumes.read_dicom_series(folder)
    assert [float(loaded.tensor[0, 0, 0, k]) for k in range(3)] == [-1024.0, -824.0, -624.0]


@pytest.mark.parametrize("odd, expected", [
    ({"plane": np.zeros((8, 8), np.uint16)}, "is 8x8 (rows x columns), 4 other slices 6x7"),
    ({"series": "1.2.3"}, "is of series 1.2.3, 4 other slices of series"),
    ({"orientation": [0, 1, 0, 0, 0, -1]}, "is oriented (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)"),
])
def test_slices_that_differ_are_refused_naming_the_file(tmp_path, odd, expected):
    positions = [[0.0, 0.0, 2.0 * k] for k in range(5)]
    folder = series_folder(tmp_path, stack(), positions, **odd)
    message = refused(volumes.read_dicom_series, folder)
    odd_name = sorted(n for n in os.listdir(folder) if n.endswith(".dcm"))
    assert "is no single DICOM series" in message and expected in message, message
    assert any(f"'{os.path.join(folder, name)}' is" in message for name in odd_name)


def test_one_slice_and_uneven_steps_are_refused(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.dcm").write_bytes(slice_bytes(stack(count=1)[0], [0.0, 0.0, 0.0], 1))
    assert "1 DICOM image file; a volume needs 2 slices" in refused(volumes.read_volume, str(one))
    (tmp_path / "empty").mkdir()
    assert "no DICOM image files" in refused(volumes.read_volume, str(tmp_path / "empty"))
    uneven = series_folder(tmp_path, stack(), [[0.0, 0.0, z] for z in (0, 2.5, 5, 8, 10.5)])
    message = refused(volumes.read_dicom_series, uneven)
    assert "uneven slice steps (2.5 to 3 mm" in message and "not resampled" in message


@pytest.mark.parametrize("kept, expected", [(0.5, "(an image without Rows and Columns)"),
                                            (0.9, "corrupt or truncated DICOM pixel data")])
def test_a_truncated_slice_is_refused_naming_it(tmp_path, kept, expected):
    folder = series_folder(tmp_path, stack(), [[0.0, 0.0, 2.0 * k] for k in range(5)])
    name = sorted(n for n in os.listdir(folder) if n.endswith(".dcm"))[4]
    data = open(os.path.join(folder, name), "rb").read()
    open(os.path.join(folder, name), "wb").write(data[:int(len(data) * kept)])
    message = refused(volumes.read_volume, folder)
    assert f"'{os.path.join(folder, name)}'" in message and expected in message, message


def test_a_series_over_the_limits_is_refused_before_decoding(tmp_path):
    folder = series_folder(tmp_path, stack(), [[0.0, 0.0, 2.0 * k] for k in range(5)])
    assert "7x6x5 = 210 voxels, more than max_image_pixels (100)" in refused(
        volumes.read_dicom_series, folder, max_voxels=100)
    assert "more than memory_limit" in refused(volumes.read_dicom_series, folder, memory_limit=500)


# -- maps ----------------------------------------------------------------------------------------

def test_a_map_cell_sits_at_its_patch_centre():
    patch, stride, offset = (5, 3, 3), (2, 2, 1), (1, 0, 2)
    cells = nifti.map_affine(PERMUTED, patch, stride, offset)
    first = [(offset[d] + cell) * stride[d] for d, cell in enumerate((1, 2, 0))]    # (4, 4, 2)
    centre = [first[d] + (patch[d] - 1) / 2 for d in range(3)]                       # (6, 5, 3)
    np.testing.assert_allclose(cells @ [1, 2, 0, 1], PERMUTED @ (centre + [1]))


@pytest.mark.parametrize("name", ["map.nii", "map.nii.gz"])
def test_a_map_is_written_as_nifti_and_read_back(tmp_path, name):
    values = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)
    affine = nifti.map_affine(PERMUTED, (3, 3, 3), (2, 2, 2))
    path = nifti.write_nifti(str(tmp_path / name), values, affine)
    image = nibabel.load(path)
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), values)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    assert volumes.read_nifti(path).info["orientation"] == "PSR"
    assert sorted(os.listdir(tmp_path)) == [name]


def test_a_failed_map_write_leaves_nothing(tmp_path):
    (tmp_path / "taken.nii.gz").mkdir()
    with pytest.raises(KqlExecutionError, match="cannot write"):
        nifti.write_nifti(str(tmp_path / "taken.nii.gz"), np.zeros((2, 2, 2), np.float32), np.eye(4))
    assert os.listdir(tmp_path) == ["taken.nii.gz"] and not os.listdir(tmp_path / "taken.nii.gz")
    with pytest.raises(KqlExecutionError, match=r"named \.nii or \.nii\.gz"):
        nifti.write_nifti(str(tmp_path / "map.png"), np.zeros((2, 2, 2), np.float32), np.eye(4))
    assert os.listdir(tmp_path) == ["taken.nii.gz"]
