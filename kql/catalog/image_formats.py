"""Decoders of the image files Pillow reads, and of .npy arrays: pixels as numpy arrays.

Each returns HxW (grey) or HxWx3 (colour) pixels, uint8, uint16 or float32 in [0, 1],
and what the header says (``format``, ``mode``, ``bits``); :func:`kql.catalog.images.read_image`
makes them a tensor. Pillow's modes: grey (``1``, ``L``, ``I;16``, ``I``, ``F``) stays
grey, ``LA`` loses its alpha, ``RGBA`` too; palette, CMYK, YCbCr, LAB become RGB. 16-bit
samples are divided by 65535 (Pillow decodes a 16-bit RGB PNG to 8 bits a sample); a
TIFF of other integer depths by its ``BitsPerSample``, of 32-bit integers stretched
min-max; float TIFFs are kept when they lie in [0, 1], else stretched. A multi-page
TIFF gives its first page, an animated GIF its first frame.

>>> import io, PIL.Image
>>> buf = io.BytesIO()
>>> PIL.Image.new("LA", (3, 2), (51, 0)).save(buf, "PNG")
>>> arr, info = decode(buf, "grey.png", 100)
>>> arr.shape, int(arr.max()), info
((2, 3), 51, {'format': 'PNG', 'mode': 'LA', 'bits': 8})
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import numpy as np

from ..errors import KqlImageError
from .images import array_problem, check_bytes, check_pixels, exception_text, reading_limit


def decode(fh, path: str, max_pixels: int, limit: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """Pillow's decoded pixels and header facts; every failure one :class:`KqlImageError` line.
    The header's size is checked before decoding: ``max_pixels``, and the bytes decoding
    takes against ``limit`` (default: ``memory_limit``). Pillow bounds what it inflates
    besides pixels itself (PNG text and ICC chunks: 1 MB each, 64 MB of text in all)."""
    from PIL import Image, UnidentifiedImageError

    limit = reading_limit(limit)
    try:
        with warnings.catch_warnings():     # our limit is checked instead of Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fh) as im:      # lazy: the header only
                check_pixels(path, im.height, im.width, max_pixels)
                check_bytes(path, "image file", decoded_bytes(im), limit,
                            "its pixels decoded, then as floats")
                raw = _rawmode(im)
                info = {"format": im.format, "mode": im.mode, "bits": _bits(im, raw)}
                im.load()
                return _pixels(im, path, raw, info["bits"]), info
    except KqlImageError:
        raise
    except UnidentifiedImageError:
        raise KqlImageError(f"cannot read image file '{path}': not an image format Pillow knows") from None
    except Image.DecompressionBombError as exc:    # over twice Pillow's limit, refused at open
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1)):,}" if found else f"over {2 * (Image.MAX_IMAGE_PIXELS or 0):,}"
        raise KqlImageError(f"image file '{path}' has {count} pixels, more than max_image_pixels "
                            f"({max_pixels:,})") from None
    except MemoryError:
        raise KqlImageError(f"image file '{path}' is too large to decode in memory") from None
    except Exception as exc:    # Pillow's plugins raise assorted errors on damaged files
        if re.search("Decompressed data too large|Too much memory used in text", str(exc)):
            raise KqlImageError(f"image file '{path}' has a compressed chunk (text or ICC "
                                "profile) that inflates to more than Pillow's limit (1.0 MB "
                                "a chunk, 64.0 MB of text in all): refused unread") from None
        raise KqlImageError(f"cannot read image file '{path}': corrupt or truncated "
                            f"({exception_text(exc)})") from None


def decoded_bytes(im) -> int:
    """What decoding ``im`` takes: its samples as Pillow holds them, an array copy of
    them, and the float32 tensor (grey: one channel, else three).

    >>> import PIL.Image
    >>> decoded_bytes(PIL.Image.new("RGB", (10, 10))), decoded_bytes(PIL.Image.new("I;16", (10, 10)))
    (1800, 800)
    """
    pixels, mode = im.width * im.height, im.mode
    sample = 4 if mode in ("I", "F") else 2 if mode.startswith("I;16") else 1
    channels = 1 if mode in _GREY else 3
    return pixels * (2 * len(im.getbands()) * sample + 4 * channels)


_GREY = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N", "P;1")


def _rawmode(im) -> str:
    """How the file lays out its samples (``"LA;16B"``, ...), known before ``load()``."""
    args = im.tile[0][3] if im.tile else None
    args = args[0] if isinstance(args, tuple) and args else args
    return args if isinstance(args, str) else ""


def _bits(im, raw: str) -> int:
    """Bits a sample as decoded: TIFF's BitsPerSample, else what Pillow's mode holds (a
    16-bit RGB PNG is decoded to 8 bits a sample)."""
    tag = getattr(im, "tag_v2", None)
    per_sample = tag.get(258) if tag is not None else None
    if isinstance(per_sample, tuple):
        per_sample = per_sample[0] if per_sample else None
    if per_sample and im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return int(per_sample or 16)
    return 16 if raw.startswith("I;16") else {"1": 1, "I": 32, "F": 32}.get(im.mode, 8)


def _pixels(im, path: str, raw: str, bits: int) -> np.ndarray:
    """HxW (grey) or HxWx3 pixels: uint8, uint16 for 16-bit, float32 in [0, 1] beyond."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16, copy=False)
    if mode == "I":
        return _integers(np.asarray(im), bits, path)
    if mode == "F":
        return _floats(np.asarray(im, dtype=np.float32), path)
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode == "LA" or raw.startswith("LA"):        # Pillow makes a 16-bit LA PNG RGBA
        return np.asarray(im)[:, :, 0]
    if mode == "RGBA":
        return np.asarray(im)[:, :, :3]
    if mode in ("P", "PA"):         # through RGBA: Pillow warns when transparency goes to RGB
        return np.asarray(im.convert("RGBA"))[:, :, :3]
    try:
        return np.asarray(im.convert("L" if mode == "1" else "RGB"))
    except ValueError:
        raise KqlImageError(f"image file '{path}' has pixel mode {mode}, which Pillow "
                            "cannot convert to RGB") from None


def _integers(arr: np.ndarray, bits: int, path: str) -> np.ndarray:
    """32-bit integer pixels of ``bits`` bits divided by their largest value; beyond 16 bits,
    or when a value does not fit, stretched min-max to [0, 1]."""
    top = 2 ** bits - 1
    if bits <= 16 and arr.size and arr.min() >= 0 and arr.max() <= top:
        return arr.astype(np.float32) / np.float32(top)
    return _stretched(arr.astype(np.float64), path).astype(np.float32)


def _floats(arr: np.ndarray, path: str) -> np.ndarray:
    """Float pixels as they are when they lie in [0, 1], else stretched min-max to it."""
    if np.isfinite(arr).all() and arr.size and 0 <= arr.min() and arr.max() <= 1:
        return arr
    return _stretched(arr, path)


def _stretched(arr: np.ndarray, path: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise KqlImageError(f"image file '{path}' holds NaN or infinite pixel values")
    span = float(arr.max() - arr.min()) or 1.0
    return (arr - arr.min()) / span


def read_npy(fh, path: str, max_pixels: int, limit: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """A .npy image: its header's shape, dtype and pixels checked before the data is read,
    and its bytes: more than the file holds (truncated, or a header that lies) or than
    ``limit`` (default: ``memory_limit``) takes with its float tensor is refused."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = header(fh)
    except (ValueError, OSError, SyntaxError) as exc:
        raise KqlImageError(f"cannot read image file '{path}': not a valid .npy header "
                            f"({exception_text(exc)})") from None
    if dtype.hasobject:
        raise KqlImageError(f"image file '{path}' holds Python objects (dtype {dtype}), "
                            "which are never unpickled")
    problem = array_problem(shape, dtype)
    if problem:
        raise KqlImageError(f"the array in image file '{path}' {problem}")
    check_pixels(path, shape[0], shape[1], max_pixels)
    stored = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    held = os.fstat(fh.fileno()).st_size - fh.tell()
    if stored > held:
        raise KqlImageError(f"cannot read image file '{path}': corrupt or truncated (its "
                            f"header says {stored:,} bytes of pixels, the file holds {held:,})")
    channels = min(shape[2], 3) if len(shape) == 3 else 1
    check_bytes(path, "image file", stored + 4 * shape[0] * shape[1] * channels,
                reading_limit(limit), "its array, then as floats")
    fh.seek(0)
    try:
        arr = np.load(fh, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise KqlImageError(f"cannot read image file '{path}': corrupt or truncated "
                            f"({exception_text(exc)})") from None
    return arr, {"format": "NPY", "dtype": str(arr.dtype), "shape": tuple(arr.shape)}
