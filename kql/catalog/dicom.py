"""DICOM scans: a file's first frame as float pixels in [0, 1], and what its header says.

A DICOM file is known by its content (``DICM`` at byte 128), never by its name, and read
by pydicom in two steps: the header alone (``stop_before_pixels``), its Rows x Columns
checked against ``max_pixels``; then the pixels of its first frame only (a multi-frame
file gives its first frame). What decoding takes is checked against ``memory_limit``
before anything is decoded: the first frame's declared Rows x Columns x samples x bits;
a deflated data set (the Deflated Explicit VR Little Endian transfer syntax) is inflated
in bounded chunks, counted first, so that a small file inflating to gigabytes is refused
having held one chunk. Grey pixels get the modality rescale (``RescaleSlope``,
``RescaleIntercept``: Hounsfield units for CT), then the first VOI window
(``WindowCenter``/``WindowWidth``, the linear function of DICOM PS3.3 C.11.2.1.2 unless
``VOILUTFunction`` names another), or the image's own min-max without one; MONOCHROME1 is
inverted, so that bright means dense as in MONOCHROME2. Colour pixels (RGB; YBR, which
pydicom converts to RGB; PALETTE COLOR through its lookup table) are scaled by their
bit depth. Every failure is one :class:`KqlImageError` line.

>>> window(np.array([-1000.0, 39.5, 1000.0]), center=40.0, width=401.0).tolist()
[0.0, 0.5, 1.0]
"""

from __future__ import annotations

import io
import warnings
import zlib
from collections.abc import Sequence
from typing import Optional

import numpy as np

from ..errors import KqlImageError
from .images import check_bytes, check_pixels, exception_text, reading_limit

MAGIC_OFFSET = 128      # a 128-byte preamble, then b"DICM"
CHUNK = 1 << 20         # bytes inflated at a time
# A deflated data set over the limit is counted on (never kept) up to this many limits or
# bytes, whichever is fewer, to say how large it is.
COUNTED, COUNTED_BYTES = 2, 4 << 30


def is_dicom(head: bytes) -> bool:
    """Whether a file's first bytes are a DICOM file's (its name does not count).

    >>> is_dicom(bytes(128) + b"DICM" + bytes(8)), is_dicom(b"\\x89PNG" + bytes(200))
    (True, False)
    """
    return head[MAGIC_OFFSET:MAGIC_OFFSET + 4] == b"DICM"


def read_dicom(fh, path: str, max_pixels: int, limit: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """float32 HxW (grey) or HxWx3 (colour) in [0, 1] from the open DICOM file ``fh``, and
    its header's facts (``format``, ``mode``, ``bits``, ``frames``, ``pixel_spacing``,
    ``window``, ...); ``limit``: the bytes decoding may take (default: ``memory_limit``)."""
    with warnings.catch_warnings():         # pydicom warns about every odd header value
        warnings.simplefilter("ignore")
        try:
            return _read(fh, path, max_pixels, reading_limit(limit))
        except KqlImageError:
            raise
        except MemoryError:
            raise KqlImageError(f"image file '{path}' is too large to decode in memory") from None
        except Exception as exc:    # a header value pydicom parses only when it is used
            raise KqlImageError(f"cannot read image file '{path}': corrupt DICOM header "
                                f"({exception_text(exc)})") from None


def _read(fh, path: str, max_pixels: int, limit: int) -> tuple[np.ndarray, dict]:
    whole = _deflated(fh, path, limit)      # None: not deflated, read from the file
    fh.seek(0)
    header = _header(fh, path) if whole is None else _checked(whole, path)
    check_pixels(path, int(header.Rows), int(header.Columns), max_pixels)
    check_bytes(path, "image file", _frame_bytes(header), limit,
                "its first frame decoded, then as floats")
    _check_decoder(header, path)
    _check_codestream(fh, whole, header, path)
    info = _info(header)
    fh.seek(0)
    arr = _first_frame(fh if whole is None else whole, path)
    if info["mode"] == "PALETTE COLOR":
        return _palette(arr, header), info
    if arr.ndim == 3:
        return _scaled(arr, info["bits"]), info
    pixels, info["window"] = _grey(arr, header, path)
    return pixels, info


def _header(fh, path: str):
    """The dataset without its pixel data; a file with no image is refused here."""
    import pydicom

    try:
        header = pydicom.dcmread(fh, stop_before_pixels=True)
    except Exception as exc:    # pydicom raises assorted errors on a damaged header
        raise KqlImageError(f"cannot read image file '{path}': corrupt or truncated DICOM "
                            f"({exception_text(exc)})") from None
    return _checked(header, path)


def _checked(header, path: str):
    """``header``, once it holds an image."""
    if not len(header):         # pydicom stops quietly where a file ends
        raise KqlImageError(f"cannot read image file '{path}': corrupt or truncated DICOM (no "
                            "data set after its file meta information)")
    if "Rows" not in header or "Columns" not in header:
        sop = header.get("SOPClassUID")
        what = f" (a {sop.name} object)" if sop is not None else ""
        raise KqlImageError(f"DICOM file '{path}' holds no image: it has no pixel data{what}")
    return header


def _check_decoder(header, path: str) -> None:
    """Refuse pixel data compressed in a way no installed plugin decodes, in one line."""
    from pydicom.pixels import get_decoder

    syntax = getattr(header.get("file_meta"), "TransferSyntaxUID", None)
    if syntax is None:
        raise KqlImageError(f"DICOM file '{path}' has no transfer syntax in its file meta "
                            "information, so its pixel data cannot be decoded")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise KqlImageError(f"DICOM file '{path}' uses transfer syntax {syntax.name}, "
                            "which pydicom cannot decode") from None
    if not decoder.is_available:
        needs = ", ".join(dep.split(" - ")[0] for dep in decoder.missing_dependencies)
        raise KqlImageError(f"DICOM file '{path}' is compressed as {syntax.name}; decoding it "
                            f"needs one of: {needs} (none is installed)")


def _check_codestream(fh, whole, header, path: str) -> None:
    """Refuse a JPEG or JPEG 2000 first frame whose own header says a larger image than
    Rows x Columns: its decoder follows the codestream, so a 16x16 scan could decode to
    Pillow's limit (179 megapixels). Read by Pillow's header parser alone; frames Pillow
    does not know are left to their decoder."""
    syntax = header.file_meta.TransferSyntaxUID
    if not syntax.is_encapsulated or syntax.name.startswith("RLE"):
        return
    import pydicom
    from PIL import Image
    from pydicom.encaps import get_frame

    try:
        fh.seek(0)
        ds = whole if whole is not None else pydicom.dcmread(fh, specific_tags=["PixelData"])
        frames = int(header.get("NumberOfFrames") or 1)
        with Image.open(io.BytesIO(get_frame(ds.PixelData, 0, number_of_frames=frames))) as im:
            width, height = im.size
    except Exception:           # not a frame Pillow parses: its decoder says what is wrong
        return
    rows, columns = int(header.Rows), int(header.Columns)
    if height > rows or width > columns:
        raise KqlImageError(f"image file '{path}' holds a {height}x{width} {syntax.name} frame "
                            f"but its DICOM header says {rows}x{columns}: refused undecoded")


def _frame_bytes(header) -> int:
    """What decoding the first frame takes: its samples as stored (Rows x Columns x
    SamplesPerPixel x BitsAllocated), a float64 copy (the rescale) and the float32 pixels.

    >>> from pydicom import Dataset
    >>> ds = Dataset(); ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 10, 20, 1, 16
    >>> _frame_bytes(ds)
    2800
    """
    pixels = int(header.Rows) * int(header.Columns) * max(int(header.get("SamplesPerPixel") or 1), 1)
    stored = -(-max(int(header.get("BitsAllocated") or 16), 1) // 8)
    return pixels * (stored + 8 + 4)


def _deflated(fh, path: str, limit: int):
    """The whole data set of a file in a deflated transfer syntax, inflated within
    ``limit`` (held twice: its bytes, then the data set read from them); None for any
    other file. pydicom would inflate it in one call, however large."""
    from pydicom.dataset import FileDataset
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    fh.seek(0)
    try:
        preamble = read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
    except Exception:           # _header says what is wrong with it
        return None
    syntax = meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_deflated:
        return None
    start, counted = fh.tell(), max(limit // 2, min(COUNTED * limit, COUNTED_BYTES))
    size = sum(len(out) for out in _inflated(fh, counted))     # counted, not kept
    over = "more than " if size > counted else ""
    size = min(size, counted)
    from ..planner.memory import size_text

    check_bytes(path, "image file", 2 * size + bool(over), limit, f"its deflated DICOM data "
                f"set inflates to {over}{size_text(size)}, held twice while read", more=bool(over))
    fh.seek(start)
    data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(fh.read(), size + 1)
    dataset = read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True)
    del data
    return FileDataset(path, dataset, preamble, meta, is_implicit_VR=False, is_little_endian=True)


def _inflated(fh, stop: int):
    """The bytes the deflate stream from ``fh`` inflates to, ``CHUNK`` at a time, until
    its end or past ``stop`` bytes (a deflate stream inflates up to 1032 times)."""
    inflater, size = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while not inflater.eof and size <= stop:
        data = inflater.unconsumed_tail or fh.read(CHUNK)
        if not data:
            break               # truncated: reading the data set says so
        out = inflater.decompress(data, CHUNK)
        size += len(out)
        yield out


def _first_frame(source, path: str) -> np.ndarray:
    """The first frame's pixels, read from the file alone (a deflated data set: from
    the data set inflated)."""
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(source, index=0)     # YBR comes back as RGB
    except MemoryError:
        raise
    except RuntimeError as exc:             # every decoding plugin failed
        raise KqlImageError(f"cannot decode the DICOM pixel data of image file '{path}' "
                            f"({exception_text(exc, whole=True)})") from None
    except Exception as exc:
        absent = isinstance(exc, AttributeError) and "no pixel data" in str(exc)
        problem = "an image header without pixel data" if absent else exception_text(exc)
    raise KqlImageError(f"cannot read image file '{path}': corrupt or truncated DICOM "
                        f"pixel data ({problem})")


def _grey(arr: np.ndarray, header, path: str) -> tuple[np.ndarray, tuple | None]:
    """Rescaled, windowed (else min-max) grey pixels in [0, 1], and the window used."""
    from pydicom.pixels import apply_rescale

    values = apply_rescale(arr, header).astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise KqlImageError(f"image file '{path}' holds NaN or infinite pixel values")
    center, width = _first(header.get("WindowCenter")), _first(header.get("WindowWidth"))
    used = (center, width) if center is not None and width is not None and width >= 1 else None
    if used:
        function = str(header.get("VOILUTFunction", "LINEAR")).upper()
        out = window(values, center, width, function)
    else:
        low, span = values.min(), float(values.max() - values.min()) or 1.0
        out = (values - low) / span
    if header.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32), used


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM's VOI window (PS3.3 C.11.2.1.2/3) of rescaled ``values``, into [0, 1].

    >>> window(np.array([0.0, 50.0, 100.0]), 50.0, 100.0, "LINEAR_EXACT").tolist()
    [0.0, 0.5, 1.0]
    >>> window(np.array([50.0]), 50.0, 100.0, "SIGMOID").tolist()
    [0.5]
    """
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    return np.clip((values - (center - 0.5)) / max(width - 1.0, 1e-12) + 0.5, 0.0, 1.0)


def _palette(arr: np.ndarray, header) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(arr, header)
    return _scaled(rgb, 8 * rgb.dtype.itemsize)


def _scaled(arr: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned colour pixels of ``bits`` bits divided by their largest value."""
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0)
    top = float(2 ** min(bits, 8 * arr.dtype.itemsize) - 1)
    return np.clip(arr.astype(np.float32) / top, 0.0, 1.0)


def _first(value) -> float | None:
    """A DICOM number, the first of a multi-valued one, or None (absent or empty).

    >>> _first([40.0, 300.0]), _first("12.5"), _first(None), _first([])
    (40.0, 12.5, None, None)
    """
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _info(header) -> dict:
    spacing = header.get("PixelSpacing")
    spacing = tuple(float(v) for v in spacing) if spacing is not None and len(spacing) == 2 else None
    syntax = getattr(header.get("file_meta"), "TransferSyntaxUID", None)
    return {"format": "DICOM", "mode": str(header.get("PhotometricInterpretation", "")),
            "bits": int(header.get("BitsStored") or header.get("BitsAllocated") or 16),
            "frames": int(header.get("NumberOfFrames") or 1),
            "modality": str(header.get("Modality", "")), "pixel_spacing": spacing,
            "rescale": (float(header.get("RescaleSlope", 1) or 1),
                        float(header.get("RescaleIntercept", 0) or 0)),
            "transfer_syntax": syntax.name if syntax is not None else None, "window": None}
