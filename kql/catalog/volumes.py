"""Volumes (CT, MRI): NIfTI files and folders of DICOM slices as float tensors, and NIfTI maps.

A volume is a float32 tensor ``[C, D, H, W]`` whose spatial axes are the file's voxel axes
(i, j, k) in file order, the order MONAI's ``LoadImage`` gives, so that a MONAI-trained 3D
model sees what it was trained on. Intensities stay as stored after the file's own scaling
(NIfTI ``scl_slope``/``scl_inter``, DICOM ``RescaleSlope``/``RescaleIntercept``: Hounsfield
units for CT), never squeezed into [0, 1]. ``info['affine']`` maps (i, j, k) to RAS+ world
millimetres, as nibabel's does; a DICOM series' LPS geometry is turned to RAS as NIfTI's is.

Sizes are checked from headers before any voxel is decoded or inflated: ``max_voxels``, and
the bytes reading takes against ``memory_limit`` (a ``.nii.gz`` claiming 10^10 voxels is
refused having inflated its 540-byte header). A file is known by its content, not its name.
Maps are written as NIfTI by :mod:`kql.results.nifti`.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import KqlImageError
from .images import MAX_PIXELS, check_bytes, exception_text, open_regular_file, reading_limit

HEAD_BYTES = 4096       # a file's first bytes that tell a NIfTI (gzip-compressed too)
NIFTI1, NIFTI2 = (348, 344, b"n+1\0"), (540, 4, b"n+2\0\r\n\x1a\n")    # size, magic offset, magic
UNEVEN = 0.01           # slice steps further apart than this (relative) are refused
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class LoadedVolume:
    """A volume's voxels ``[C, D, H, W]`` float32 and what its header says (``format``,
    ``affine``, ``spacing``, ``shape``, ``orientation``, ...)."""

    tensor: torch.Tensor
    info: dict


def is_nifti(head: bytes) -> bool:
    """Whether a file's first bytes (:data:`HEAD_BYTES`) are a single-file NIfTI-1 or -2
    volume's, plain or gzip-compressed (only its header is inflated).

    >>> import nibabel
    >>> header = nibabel.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)).header
    >>> is_nifti(header.binaryblock), is_nifti(gzip.compress(header.binaryblock)), is_nifti(b"P5")
    (True, True, False)
    """
    if head[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, NIFTI2[0])
        except zlib.error:
            return False
    return _nifti_kind(head) is not None


def _nifti_kind(head: bytes):
    """nibabel's header class for the header bytes ``head``, or None."""
    import nibabel

    for (size, at, magic), kind in ((NIFTI1, nibabel.Nifti1Header), (NIFTI2, nibabel.Nifti2Header)):
        sized = head[:4] in (size.to_bytes(4, "little"), size.to_bytes(4, "big"))
        if sized and head[at:at + len(magic)] == magic:
            return kind
    return None


def read_nifti(path: str, max_voxels: int = MAX_PIXELS,
               memory_limit: Optional[int] = None) -> LoadedVolume:
    """A NIfTI-1 or -2 file (``.nii``, gzip-compressed or not) as ``[C, D, H, W]``: 3D data
    is one channel, 4D data of c volumes c channels (axes past the fourth may be 1: NIfTI
    keeps a vector field as x, y, z, 1, c). Values scaled by ``scl_slope``/``scl_inter``."""
    import nibabel

    with open_regular_file(path, "volume file") as raw, _one_line(f"volume file '{path}'", "NIfTI"):
        packed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if packed else raw
        head = stream.read(NIFTI2[0])   # bounded: the header alone is inflated
        kind = _nifti_kind(head)
        if kind is None:
            raise KqlImageError(f"volume file '{path}' is not a NIfTI-1 or NIfTI-2 file")
        header = kind(head[:kind.template_dtype.itemsize], check=False)
        shape, end = _checked_shape(header, path, max_voxels, reading_limit(memory_limit))
        stream.seek(0)
        holder = nibabel.FileHolder(fileobj=_Bounded(stream, end))
        image = nibabel.Nifti1Image if kind is nibabel.Nifti1Header else nibabel.Nifti2Image
        image = image.from_file_map({"header": holder, "image": holder}, mmap=False)
        data = image.get_fdata(caching="unchanged", dtype=np.float32)
    _check_finite(data, f"volume file '{path}'")
    volume = np.moveaxis(data.reshape(shape), 3, 0)
    info = _geometry_info("NIfTI", image.affine, shape[:3])
    info["dtype"] = header.get_data_dtype().name
    return LoadedVolume(torch.from_numpy(np.ascontiguousarray(volume)), info)


def _checked_shape(header, path: str, max_voxels: int, limit: int) -> tuple:
    """``(x, y, z, c)`` of a NIfTI header and the byte its voxels end at; refused when it
    is no volume, holds more than ``max_voxels`` values or would take more than ``limit``
    bytes to read."""
    dims = tuple(int(d) for d in header.get_data_shape())
    try:
        dtype = header.get_data_dtype()
    except KeyError:
        raise KqlImageError(f"volume file '{path}' has an unknown NIfTI datatype code "
                            f"{int(header['datatype'])}") from None
    extra = [d for d in dims[3:] if d != 1]
    size = "x".join(map(str, dims))
    if len(dims) < 3 or len(extra) > 1:
        raise KqlImageError(f"volume file '{path}' holds {len(dims)}-D data ({size}); a volume "
                            "has 3 spatial axes and at most one of channels")
    if dtype.kind not in "uif" or dtype.fields:
        raise KqlImageError(f"volume file '{path}' holds {dtype.name} voxels; only real numbers are read")
    voxels = int(np.prod(dims, dtype=object))
    if min(dims) < 1:
        raise KqlImageError(f"volume file '{path}' is empty ({size} voxels)")
    if voxels > max_voxels:
        raise KqlImageError(f"volume file '{path}' has {size} = {voxels:,} voxels, more than "
                            f"max_image_pixels ({max_voxels:,})")
    offset = int(header.get_data_offset())     # extensions before it are held too
    if offset < len(header.binaryblock) + 4:
        raise KqlImageError(f"cannot read volume file '{path}': corrupt NIfTI header (its voxels "
                            f"would start at byte {offset}, inside its header)")
    # Stored, scaled by nibabel (float64), as float32, then channels first: measured.
    check_bytes(path, "volume file", offset + voxels * (dtype.itemsize + 16), limit,
                "its header, its voxels as stored, then as floats")
    return dims[:3] + (extra[0] if extra else 1,), offset + voxels * dtype.itemsize


class _Bounded:
    """A stream read no further than byte ``end`` (its header's offset and voxels): a forged
    extension size cannot make nibabel inflate gigabytes that nothing accounted for."""

    def __init__(self, stream, end: int):
        self.stream, self.end = stream, end

    def read(self, size: Optional[int] = -1) -> bytes:
        left = max(self.end - self.stream.tell(), 0)
        return self.stream.read(left if size is None or size < 0 else min(size, left))

    def readinto(self, buffer) -> int:
        return self.stream.readinto(memoryview(buffer).cast("B")[:max(self.end - self.stream.tell(), 0)])

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _one_line(what: str, kind: str):
    """Whatever nibabel, pydicom, gzip or zlib raise reading ``what`` (a damaged file, a
    header value parsed only when used) as one :class:`KqlImageError` line; no warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # both warn about every odd header field
        try:
            yield
        except KqlImageError:
            raise
        except MemoryError:
            raise KqlImageError(f"{what} is too large to read in memory") from None
        except Exception as exc:
            raise KqlImageError(f"cannot read {what}: corrupt or truncated {kind} "
                                f"({exception_text(exc)})") from None


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise KqlImageError(f"{what} holds NaN or infinite voxel values")


def _geometry_info(fmt: str, affine, shape) -> dict:
    import nibabel

    affine = np.asarray(affine, dtype=np.float64)
    codes = nibabel.aff2axcodes(affine)
    sizes = tuple(float(v) for v in nibabel.affines.voxel_sizes(affine))
    info = {"format": fmt, "affine": [[float(v) for v in row] for row in affine],
            "shape": tuple(int(s) for s in shape)}
    if min(sizes) > 0:                     # a degenerate affine gives no voxel size
        info["spacing"] = sizes
    if None not in codes:                  # nor an orientation
        info["orientation"] = "".join(codes)
    return info


def from_user(volume, affine=None) -> tuple:
    """``(tensor, info)``: a volume given from Python (a torch tensor or numpy array
    ``[C, D, H, W]`` or ``[D, H, W]``) as float32 ``[C, D, H, W]``, and with a 4x4
    ``affine`` the geometry a file's would give (spacing, orientation); a one-line
    :class:`KqlImageError` for anything else."""
    if isinstance(volume, np.ndarray):
        if not (np.issubdtype(volume.dtype, np.number) or volume.dtype == bool):
            raise KqlImageError(f"a volume array must be numeric, got {volume.dtype}")
        volume = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    if not isinstance(volume, torch.Tensor):
        raise KqlImageError(f"a volume must be a torch tensor or a numpy array, not {type(volume).__name__}")
    t = volume.detach().to("cpu", torch.float32)
    t = t.unsqueeze(0) if t.dim() == 3 else t
    if t.dim() != 4 or min(t.shape) < 1:
        raise KqlImageError(f"a volume must have shape [C, D, H, W] or [D, H, W], got {list(volume.shape)}")
    if not torch.isfinite(t).all():
        raise KqlImageError("the volume contains NaN or infinite values")
    if affine is None:
        return t.contiguous(), {"format": "volume", "shape": tuple(int(v) for v in t.shape[1:])}
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise KqlImageError(f"a volume's affine must be a finite 4x4 matrix, got shape {list(a.shape)}")
    return t.contiguous(), _geometry_info("volume", a, t.shape[1:])


# -- DICOM series ----------------------------------------------------------------------------

def read_dicom_series(folder: str, max_voxels: int = MAX_PIXELS,
                      memory_limit: Optional[int] = None) -> LoadedVolume:
    """The DICOM slices of ``folder`` (its other files are passed over) as ``[1, D, H, W]``,
    axes (column, row, slice) as nibabel and MONAI give them: ``tensor[0, i, j, k]`` is
    slice k's pixel at row j, column i. Slices are sorted along their normal by
    ``ImagePositionPatient`` (else by ``InstanceNumber``) and rescaled; a mixed series,
    slices of other sizes or orientations, and uneven steps are refused, never resampled."""
    with _one_line(f"DICOM series '{folder}'", "DICOM"):
        return _read_series(folder, max_voxels, reading_limit(memory_limit))


def _read_series(folder: str, max_voxels: int, limit: int) -> LoadedVolume:
    slices = _series_headers(folder, limit)
    first = _check_alike(folder, slices)
    order, affine, step = _slice_geometry(folder, slices)
    rows, columns = int(first.Rows), int(first.Columns)
    voxels = rows * columns * len(slices)
    if voxels > max_voxels:
        raise KqlImageError(f"DICOM series '{folder}' has {columns}x{rows}x{len(slices)} = "
                            f"{voxels:,} voxels, more than max_image_pixels ({max_voxels:,})")
    stored = -(-int(first.get("BitsAllocated") or 16) // 8)     # a slice: read, decoded, rescaled
    check_bytes(folder, "DICOM series", 4 * voxels + rows * columns * (2 * stored + 12), limit,
                "its voxels as floats, and a slice decoded")
    volume = np.empty((columns, rows, len(slices)), np.float32)
    for k, index in enumerate(order):
        volume[:, :, k] = _slice_pixels(*slices[index], (rows, columns), limit).T
    info = _geometry_info("DICOM series", affine, volume.shape)
    info["slices"], info["spacing"] = len(slices), info["spacing"][:2] + (step,)
    if first.get("Modality"):
        info["modality"] = str(first.Modality)
    return LoadedVolume(torch.from_numpy(volume)[None], info)


def _series_headers(folder: str, limit: int) -> list:
    """``(path, header)`` of each DICOM image file in ``folder``, in name order; headers are
    read without pixel data (a deflated data set is inflated within ``limit``)."""
    import pydicom

    from .dicom import _deflated, is_dicom

    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except OSError as exc:
        raise KqlImageError(f"cannot read folder '{folder}': {exception_text(exc)}") from None
    slices = []
    for path in (os.path.join(folder, name) for name in names):
        if not os.path.isfile(path):
            continue            # folders, FIFOs, devices: passed over, never opened
        with open_regular_file(path, "DICOM file") as fh, _one_line(f"DICOM file '{path}'", "DICOM"):
            if not is_dicom(fh.read(132)):
                continue
            whole = _deflated(fh, path, limit)
            fh.seek(0)
            header = whole if whole is not None else pydicom.dcmread(fh, stop_before_pixels=True,
                                                                      defer_size=1 << 20)
            if not len(header):         # pydicom stops quietly where a file ends
                raise ValueError("no data set after its file meta information")
        if "Rows" not in header or "Columns" not in header:
            if "Image Storage" in getattr(header.get("SOPClassUID"), "name", ""):
                raise KqlImageError(f"cannot read DICOM file '{path}': corrupt or truncated DICOM "
                                    "(an image without Rows and Columns)")
            continue            # a DICOMDIR, a report: no image
        if int(header.get("NumberOfFrames") or 1) > 1 or int(header.get("SamplesPerPixel") or 1) > 1:
            raise KqlImageError(f"DICOM file '{path}' is not one grey frame; a series folder "
                                "holds one slice a file")
        slices.append((path, header))
    if len(slices) < 2:
        raise KqlImageError(f"folder '{folder}' holds {len(slices) or 'no'} DICOM image "
                            f"file{'' if len(slices) == 1 else 's'}; a volume needs 2 slices or more")
    return slices


def _check_alike(folder: str, slices: list):
    """The first slice's header, once every slice is of one series, one size and one
    orientation; else an error naming a file that differs from most."""
    checks = (("of series {}", lambda h: str(h.get("SeriesInstanceUID", ""))),
              ("{} (rows x columns)", lambda h: f"{int(h.Rows)}x{int(h.Columns)}"),
              ("oriented {}", lambda h: tuple(round(float(v), 4) for v in _cosines(h))))
    for what, key in checks:
        values = [key(header) for _, header in slices]
        common, count = Counter(values).most_common(1)[0]
        odd = next((i for i, v in enumerate(values) if v != common), None)
        if odd is not None:
            raise KqlImageError(f"folder '{folder}' is no single DICOM series: '{slices[odd][0]}' is "
                                f"{what.format(values[odd])}, {count} other slices {what.format(common)}")
    return slices[0][1]


def _cosines(header) -> list:
    """``ImageOrientationPatient``: the row, then the column direction (LPS); axial without it."""
    cosines = header.get("ImageOrientationPatient")
    return [float(v) for v in cosines] if cosines is not None and len(cosines) == 6 else [1, 0, 0, 0, 1, 0]


def _slice_geometry(folder: str, slices: list) -> tuple:
    """The slices' order, the RAS affine of (column, row, slice) and the slice step (mm)."""
    header = slices[0][1]
    cosines = np.array(_cosines(header))
    normal = np.cross(cosines[:3], cosines[3:])
    positions = [h.get("ImagePositionPatient") for _, h in slices]
    if all(p is not None and len(p) == 3 for p in positions):
        points = np.array([[float(v) for v in p] for p in positions])
        distance = points @ normal
        order = np.argsort(distance, kind="stable")
        steps = np.diff(distance[order])
        step = float(steps.mean())
        if steps.min() <= 1e-6 * max(1.0, abs(step)):
            same = [slices[order[i]][0] for i in (int(steps.argmin()), int(steps.argmin()) + 1)]
            raise KqlImageError(f"DICOM files '{same[0]}' and '{same[1]}' are slices at one position")
        if np.abs(steps - step).max() > UNEVEN * step:
            raise KqlImageError(f"DICOM series '{folder}' has uneven slice steps ({steps.min():.4g} "
                                f"to {steps.max():.4g} mm, more than {UNEVEN:.0%} apart): not resampled")
        origin, across = points[order[0]], (points[order[-1]] - points[order[0]]) / (len(slices) - 1)
    else:
        numbers = [h.get("InstanceNumber") for _, h in slices]
        if any(n is None or n == "" for n in numbers) or len(set(map(int, numbers))) < len(numbers):
            raise KqlImageError(f"DICOM series '{folder}' has neither positions "
                                "(ImagePositionPatient) nor distinct InstanceNumbers to order its slices")
        order = np.argsort([int(n) for n in numbers], kind="stable")
        step = float(header.get("SpacingBetweenSlices") or header.get("SliceThickness") or 1.0)
        origin, across = np.zeros(3), normal * step
    spacing = header.get("PixelSpacing")
    pixel = [float(v) for v in spacing] if spacing is not None and len(spacing) == 2 else [1.0, 1.0]
    row_step, column_step = pixel       # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = cosines[:3] * column_step, cosines[3:] * row_step
    lps[:3, 2], lps[:3, 3] = across, origin
    return order, LPS_TO_RAS @ lps, step


def _slice_pixels(path: str, header, size: tuple, limit: int) -> np.ndarray:
    """One slice's rescaled pixels ``[rows, columns]`` float32, decoded from its file."""
    from pydicom.pixels import apply_rescale

    from .dicom import _check_codestream, _check_decoder, _deflated, _first_frame

    with open_regular_file(path, "DICOM file") as fh:
        whole = _deflated(fh, path, limit)
        fh.seek(0)
        _check_decoder(header, path)
        _check_codestream(fh, whole, header, path)
        fh.seek(0)
        pixels = _first_frame(fh if whole is None else whole, path)
    if pixels.shape != size:
        raise KqlImageError(f"DICOM file '{path}' decodes to {pixels.shape}, not its header's {size}")
    values = np.asarray(apply_rescale(pixels, header), dtype=np.float32)
    _check_finite(values, f"DICOM file '{path}'")
    return values


# -- any volume, and maps ----------------------------------------------------------------------

def is_volume_path(path: str) -> bool:
    """Whether ``path`` is a folder holding DICOM slices or a NIfTI file, by content (a
    folder of anything else is no volume: reading it says it is a folder).

    >>> is_volume_path("/"), is_volume_path("/dev/null"), is_volume_path("/no/such/file")
    (False, False, False)
    """
    if os.path.isdir(path):
        return holds_dicom(path)
    if not os.path.isfile(path):    # a FIFO would block open() forever
        return False
    try:
        with open(path, "rb") as fh:
            return is_nifti(fh.read(HEAD_BYTES))
    except OSError:
        return False


def holds_dicom(folder: str, look: int = 64) -> bool:
    """Whether one of the first ``look`` regular files of ``folder`` is a DICOM file."""
    from .dicom import is_dicom

    try:
        with os.scandir(folder) as entries:
            for entry in itertools.islice((e for e in entries if e.is_file(follow_symlinks=False)), look):
                with open(entry.path, "rb") as fh:
                    if is_dicom(fh.read(132)):
                        return True
    except OSError:
        return False
    return False


def read_volume(path: str, max_voxels: int = MAX_PIXELS,
                memory_limit: Optional[int] = None) -> LoadedVolume:
    """A folder of DICOM slices (:func:`read_dicom_series`) or a NIfTI file (:func:`read_nifti`)."""
    if os.path.isdir(path):
        return read_dicom_series(path, max_voxels, memory_limit)
    with open_regular_file(path, "volume file") as fh:
        head = fh.read(HEAD_BYTES)
    if is_nifti(head):
        return read_nifti(path, max_voxels, memory_limit)
    raise KqlImageError(f"volume file '{path}' is neither NIfTI (.nii, .nii.gz) nor a folder of DICOM slices")
