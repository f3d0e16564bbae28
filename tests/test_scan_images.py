"""Images as scans come: grey stays one channel, 16-bit and float files keep their values,
DICOM is rescaled and windowed, and a scan reaches a grey or a colour model through query
text. Every file is made here, in ``tmp_path``; pydicom's own test files are read offline.
"""

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from torch import nn

import kql
from helpers import sensitive
from kql.catalog import images
from models_zoo import small_cnn


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def read(tmp_path, name: str, data: bytes) -> images.LoadedImage:
    (tmp_path / name).write_bytes(data)
    return images.read_image(str(tmp_path / name))


def load(tmp_path, name: str, data: bytes) -> torch.Tensor:
    return read(tmp_path, name, data).tensor


GREY = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
COLOUR = np.stack([GREY, 255 - GREY, np.full_like(GREY, 7)], -1)


# -- channels of Pillow's kinds ------------------------------------------------------------------

def test_grey_png_keeps_one_channel(tmp_path):
    t = load(tmp_path, "grey.png", encoded(Image.fromarray(GREY), "PNG"))
    assert t.shape == (1, 12, 16) and t.dtype == torch.float32 and t.is_contiguous()
    assert torch.equal(t[0], torch.from_numpy(GREY).float() / 255)


def test_alpha_is_dropped(tmp_path):
    rgba = np.dstack([COLOUR, np.full_like(GREY, 9)])
    t = load(tmp_path, "rgba.png", encoded(Image.fromarray(rgba), "PNG"))
    assert torch.equal(t, torch.from_numpy(COLOUR).permute(2, 0, 1).float() / 255)
    la = load(tmp_path, "la.png", encoded(Image.fromarray(GREY).convert("LA"), "PNG"))
    assert torch.equal(la[0], torch.from_numpy(GREY).float() / 255) and la.shape[0] == 1


def test_palette_cmyk_and_bilevel(tmp_path):
    palette = load(tmp_path, "p.png", encoded(Image.fromarray(COLOUR).convert("P"), "PNG"))
    expected = np.asarray(Image.fromarray(COLOUR).convert("P").convert("RGB"))
    assert torch.equal(palette, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
    assert load(tmp_path, "c.jpg", encoded(Image.fromarray(COLOUR).convert("CMYK"), "JPEG")).shape[0] == 3
    clear = Image.fromarray(np.dstack([COLOUR, GREY])).convert("P")        # transparency as bytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(tmp_path, "clear.png", encoded(clear, "PNG")).shape == (3, 12, 16)
    bilevel = load(tmp_path, "b.png", encoded(Image.fromarray(GREY > 100), "PNG"))
    assert bilevel.shape == (1, 12, 16) and torch.equal(bilevel[0], torch.from_numpy(GREY > 100).float())


def test_16_bit_grey_png_is_divided_by_65535(tmp_path):
    arr = np.array([[0, 1, 1000], [32768, 65534, 65535]], np.uint16)
    loaded = read(tmp_path, "x.png", encoded(Image.fromarray(arr), "PNG"))
    assert loaded.tensor.shape == (1, 2, 3)
    np.testing.assert_allclose(loaded.tensor[0].numpy(), arr / 65535, atol=1e-6)
    assert loaded.info == {"format": "PNG", "mode": "I;16", "bits": 16}


def png16(colour_type: int, samples: list[int], width: int) -> bytes:
    """A one-row 16-bit PNG (colour type 2: RGB, 4: grey and alpha) Pillow cannot write."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, 1, 16, colour_type, 0, 0, 0)
    row = b"\x00" + struct.pack(f">{len(samples)}H", *samples)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row))
            + chunk(b"IEND", b""))


def test_16_bit_png_with_alpha_or_colour(tmp_path):
    """Pillow decodes both to 8 bits a sample (and grey with alpha to RGBA): grey stays grey."""
    la = read(tmp_path, "la16.png", png16(4, [0, 65535, 30000, 0], 2))
    assert la.tensor.shape == (1, 1, 2) and (la.tensor[0, 0] * 255).tolist() == [0.0, 117.0]
    rgb = read(tmp_path, "rgb16.png", png16(2, [0, 32768, 65535, 1000, 2000, 3000], 2))
    assert rgb.tensor.shape == (3, 1, 2) and (rgb.tensor[:, 0, 0] * 255).tolist() == [0.0, 128.0, 255.0]
    assert rgb.info == {"format": "PNG", "mode": "RGB", "bits": 8}


def test_16_bit_and_float_tiff(tmp_path):
    arr = np.array([[0, 4096, 65535]], np.uint16)
    np.testing.assert_allclose(load(tmp_path, "a.tif", encoded(Image.fromarray(arr), "TIFF"))[0].numpy(),
                               arr / 65535, atol=1e-6)
    unit = np.array([[0.0, 0.25, 1.0]], np.float32)             # in [0, 1]: kept
    assert load(tmp_path, "u.tif", encoded(Image.fromarray(unit), "TIFF"))[0].tolist() == unit.tolist()
    wide = read(tmp_path, "w.tif", encoded(Image.fromarray(np.array([[-5.0, 0.0, 15.0]], np.float32)),
                                           "TIFF"))
    assert wide.tensor[0].tolist() == [[0.0, 0.25, 1.0]]                # beyond it: stretched
    assert wide.info == {"format": "TIFF", "mode": "F", "bits": 32}


def test_a_multi_page_tiff_gives_its_first_page(tmp_path):
    pages = [Image.fromarray(np.full((3, 4), v, np.uint8)) for v in (51, 102)]
    t = load(tmp_path, "pages.tif", encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    assert t.shape == (1, 3, 4) and float(t.max()) == pytest.approx(0.2)


def test_arrays_and_tensors_keep_their_channels():
    assert images.to_tensor(GREY).shape == (1, 12, 16)
    assert images.to_tensor(GREY[:, :, None]).shape == (1, 12, 16)
    assert images.to_tensor(COLOUR).shape == (3, 12, 16)
    assert images.to_tensor(np.dstack([COLOUR, GREY])).shape == (3, 12, 16)
    sixteen = np.array([[0, 65535], [1, 30000]], np.uint16)
    np.testing.assert_allclose(images.to_tensor(sixteen)[0].numpy(), sixteen / 65535, atol=1e-6)
    grey = torch.rand(1, 5, 6)
    assert torch.equal(images.to_tensor(grey), grey)
    assert images.to_tensor(grey[0]).shape == (1, 5, 6)
    rgba = torch.rand(4, 5, 6)
    assert torch.equal(images.to_tensor(rgba), rgba[:3])


@pytest.mark.parametrize("name,channels", [("camera", 1), ("moon", 1), ("coins", 1), ("page", 1),
                                           ("horse", 1), ("chelsea", 3), ("logo", 3)])
def test_samples_keep_their_channels(name, channels):
    assert images.load_sample(name).shape[0] == channels


# -- DICOM ---------------------------------------------------------------------------------------

def scan(height=16, width=20) -> np.ndarray:
    """Stored values of a smooth 12-bit CT-like scan: a gradient and a bright blob."""
    ys, xs = np.mgrid[0:height, 0:width]
    blob = np.exp(-((ys - height / 3) ** 2 + (xs - width / 2) ** 2) / (2 * (width / 5) ** 2))
    return (400 + 20 * ys + 8 * xs + 1800 * blob).astype(np.uint16)


def dicom_bytes(pixels: np.ndarray, mode="MONOCHROME2", **elements) -> bytes:
    """A DICOM file (preamble, DICM, file meta, Explicit VR Little Endian) of ``pixels``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PixelSpacing = "CT", [0.5, 0.75]
    if pixels is not None:
        ds.set_pixel_data(pixels, mode, 12 if pixels.dtype == np.uint16 else 8)
    for key, value in elements.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def windowed(stored, slope=2.0, intercept=-1024.0, center=40.0, width=400.0) -> np.ndarray:
    """DICOM's linear VOI window (PS3.3 C.11.2.1.2) of the rescaled values, into [0, 1]."""
    hu = stored.astype(np.float64) * slope + intercept
    return np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


CT = {"RescaleSlope": 2, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}


def test_a_dicom_is_rescaled_then_windowed(tmp_path):
    pixels = scan()
    loaded = read(tmp_path, "ct.dcm", dicom_bytes(pixels, **CT))
    assert loaded.tensor.shape == (1, 16, 20) and loaded.tensor.dtype == torch.float32
    np.testing.assert_allclose(loaded.tensor[0].numpy(), windowed(pixels), atol=1e-6)
    inside = ((loaded.tensor > 0) & (loaded.tensor < 1)).sum()
    assert float(loaded.tensor.min()) == 0.0 and float(loaded.tensor.max()) == 1.0 and inside > 5
    info = loaded.info
    assert info["format"] == "DICOM" and info["mode"] == "MONOCHROME2" and info["bits"] == 12
    assert info["pixel_spacing"] == (0.5, 0.75) and info["window"] == (40.0, 400.0)
    assert info["rescale"] == (2.0, -1024.0) and info["frames"] == 1 and info["modality"] == "CT"


def test_the_first_of_several_windows_is_used(tmp_path):
    pixels = scan()
    data = dicom_bytes(pixels, **{**CT, "WindowCenter": [300, 40], "WindowWidth": [1500, 400]})
    np.testing.assert_allclose(load(tmp_path, "w.dcm", data)[0].numpy(),
                               windowed(pixels, center=300, width=1500), atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    pixels = scan()
    t = load(tmp_path, "m1.dcm", dicom_bytes(pixels, "MONOCHROME1", **CT))
    np.testing.assert_allclose(t[0].numpy(), 1 - windowed(pixels), atol=1e-6)


def test_without_a_window_min_max(tmp_path):
    pixels = scan()
    loaded = read(tmp_path, "n.dcm", dicom_bytes(pixels, RescaleSlope=2, RescaleIntercept=-1024))
    expected = (pixels - pixels.min()) / float(pixels.max() - pixels.min())
    np.testing.assert_allclose(loaded.tensor[0].numpy(), expected, atol=1e-6)
    assert loaded.info["window"] is None


def test_a_colour_dicom_has_three_channels(tmp_path):
    rgb = np.stack([GREY, 255 - GREY, np.full_like(GREY, 7)], -1)
    t = load(tmp_path, "rgb.dcm", dicom_bytes(rgb, "RGB"))
    assert torch.equal(t, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_a_multi_frame_dicom_gives_its_first_frame(tmp_path):
    frames = np.stack([scan(), scan()[::-1].copy()])
    loaded = read(tmp_path, "f.dcm", dicom_bytes(frames, **CT))
    np.testing.assert_allclose(loaded.tensor[0].numpy(), windowed(frames[0]), atol=1e-6)
    assert loaded.info["frames"] == 2


@pytest.mark.parametrize("name", ["scan.png", "scan", "scan.jpg"])
def test_a_dicom_is_known_by_its_content_not_its_name(tmp_path, name):
    pixels = scan()
    (tmp_path / name).write_bytes(dicom_bytes(pixels, **CT))
    assert images.read_image(str(tmp_path / name)).info["format"] == "DICOM"


def test_pydicom_s_own_ct_scan():
    path = pydicom.data.get_testdata_file("CT_small.dcm", download=False)
    assert path is not None, "pydicom's test file should ship with it"
    loaded = images.read_image(path)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(loaded.tensor[0].numpy(), (hu - hu.min()) / (hu.max() - hu.min()),
                               atol=1e-6)
    assert loaded.tensor.shape == (1, 128, 128)
    assert loaded.info["pixel_spacing"] == pytest.approx((0.661468, 0.661468))


def error(path, **kwargs) -> str:
    with pytest.raises(kql.KqlImageError) as info:
        images.load_file(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_damaged_dicoms_are_one_line(tmp_path):
    data = dicom_bytes(scan(), **CT)
    (tmp_path / "short.dcm").write_bytes(data[:-100])                    # pixel data cut
    assert "corrupt or truncated DICOM pixel data" in error(tmp_path / "short.dcm")
    for cut in (140, 150, 300):                                          # header cut
        (tmp_path / "head.dcm").write_bytes(data[:cut])
        assert error(tmp_path / "head.dcm").endswith(
            "corrupt or truncated DICOM (no data set after its file meta information)")
    (tmp_path / "rows.dcm").write_bytes(dicom_bytes(None, Rows=4, Columns=4))
    assert error(tmp_path / "rows.dcm").endswith(
        "corrupt or truncated DICOM pixel data (an image header without pixel data)")
    (tmp_path / "noise.dcm").write_bytes(bytes(128) + b"DICM" + bytes(range(256)) * 4)
    assert "DICOM" in error(tmp_path / "noise.dcm")       # whatever pydicom made of it


def test_a_dicom_without_pixels(tmp_path):
    (tmp_path / "report.dcm").write_bytes(dicom_bytes(None))
    assert error(tmp_path / "report.dcm").endswith(
        "holds no image: it has no pixel data (a CT Image Storage object)")


def test_a_huge_dicom_header_is_refused_before_decoding(tmp_path, monkeypatch):
    decoded = []
    real = pydicom.pixels.pixel_array
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: decoded.append(1) or real(*a, **k))
    (tmp_path / "big.dcm").write_bytes(dicom_bytes(scan(), Rows=60000, Columns=60000))
    assert error(tmp_path / "big.dcm").endswith(
        "has 60000x60000 = 3,600,000,000 pixels, more than max_image_pixels (64,000,000)")
    (tmp_path / "small.dcm").write_bytes(dicom_bytes(scan(), **CT))
    assert error(tmp_path / "small.dcm", max_pixels=100).endswith(
        "16x20 = 320 pixels, more than max_image_pixels (100)")
    assert decoded == []
    assert images.load_file(str(tmp_path / "small.dcm"), max_pixels=320).shape == (1, 16, 20)
    assert decoded == [1]


def test_a_compression_without_its_decoder_is_said(tmp_path):
    from pydicom.pixels import get_decoder

    path = pydicom.data.get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if path is None or get_decoder(syntax).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    assert error(path).endswith("is compressed as JPEG-LS Lossless Image Compression; decoding it "
                                "needs one of: gdcm, pylibjpeg, pyjpegls (none is installed)")


def test_every_file_pydicom_ships_reads_or_is_refused_in_one_line():
    """Compressed, big-endian, deflated, palette, YBR, multi-frame, damaged, no pixels..."""
    folder = pydicom.data.get_testdata_file("CT_small.dcm", download=False).rsplit("/", 1)[0]
    read_ok, formats = 0, set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            try:
                loaded = images.read_image(str(path))
            except kql.KqlImageError as exc:
                assert "\n" not in str(exc)
                continue
            read_ok += 1
            formats.add(loaded.info["format"])
            assert loaded.tensor.shape[0] in (1, 3) and 0 <= float(loaded.tensor.min())
            assert float(loaded.tensor.max()) <= 1
    assert read_ok > 20 and "DICOM" in formats


# -- through query text ---------------------------------------------------------------------------

def grey_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.fixture
def scan_path(tmp_path):
    path = tmp_path / "scan.dcm"
    path.write_bytes(dicom_bytes(scan(24, 28), **{**CT, "WindowCenter": 1500, "WindowWidth": 4000}))
    return path


def test_a_dicom_through_a_grey_model(tmp_path, scan_path):
    image = images.load_file(str(scan_path))
    con = kql.connect(str(tmp_path / "catalog"))
    con.register_model("g", sensitive(grey_cnn(), image))
    r = con.execute(f"OCCLUDE '{scan_path}' USING g PATCH 4 STRIDE 4")
    assert r.heatmap.shape == ((24 - 4) // 4 + 1, (28 - 4) // 4 + 1)
    assert r.heatmap.max() - r.heatmap.min() > 1e-6
    assert r.image_info["format"] == "DICOM"
    assert tuple(r.image_info["pixel_spacing"]) == pytest.approx((0.5, 0.75))
    con.execute(f"LOAD IMAGE s FROM '{scan_path}'")
    again = con.execute("OCCLUDE s USING g PATCH 4 STRIDE 4")
    np.testing.assert_allclose(again.heatmap, r.heatmap, atol=1e-6)


def test_a_dicom_through_a_colour_model(tmp_path, scan_path):
    image = images.load_file(str(scan_path))
    con = kql.connect(str(tmp_path / "catalog"))
    con.register_model("c", sensitive(small_cnn(4), image.expand(3, -1, -1)))
    r = con.execute(f"OCCLUDE '{scan_path}' USING c PATCH 4 STRIDE 4")
    assert r.heatmap.shape == (6, 7) and r.heatmap.max() - r.heatmap.min() > 1e-6
