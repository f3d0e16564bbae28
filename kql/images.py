"""Images: reading files, skimage samples and user arrays into one form, and resizing.

Every image becomes a float32 tensor ``[3, H, W]`` in pixel space, values in [0, 1].
Greyscale is repeated to three channels; an alpha channel is dropped. :func:`resize`
brings it to the size a model expects (still pixel space, before normalisation).

Files are checked before they are read: a regular file (a FIFO would block ``open()``
forever), its size from the header (Pillow opens lazily; a .npy header is read alone)
against ``max_pixels``, and a .npy never unpickles (``allow_pickle=False``).

>>> import numpy as np
>>> to_tensor(np.zeros((4, 5, 3), dtype=np.uint8)).shape
torch.Size([3, 4, 5])
>>> to_tensor(np.full((2, 2), 255, dtype=np.uint8))[:, 0, 0].tolist()
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

import errno
import os
import re
import stat
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .errors import KqlImageError, strip_ansi

# The largest image file read, in pixels (height x width). 64 megapixels holds every
# phone's and camera's full-resolution photo up to 61 MP (a 50 MP phone: 8160x6120; a
# 61 MP full frame: 9504x6336) and stays below Pillow's own warning threshold (89.5 MP);
# its [3, H, W] float32 tensor is 768 MB, and reading a PNG of that size takes 1.0 GB
# at the peak (16 bytes a pixel). A 100 MP medium-format scan is refused: the models
# resize to a few hundred pixels a side, so a larger image only costs memory.
MAX_PIXELS = 64_000_000

# skimage.data loaders that return a colour or greyscale photo without a download.
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
           "immunohistochemistry", "camera", "moon", "coins", "cat", "horse", "page",
           "text", "grass", "gravel", "brick", "clock", "logo", "colorwheel")


def to_tensor(image) -> torch.Tensor:
    """Convert a user image (torch float [3,H,W] in [0,1], or numpy HxW[xC]) to [3,H,W]."""
    if isinstance(image, torch.Tensor):
        return _from_tensor(image)
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise KqlImageError(f"an image must be a torch tensor or a numpy array, not {type(image).__name__}")


def _from_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise KqlImageError(f"an image tensor must have shape [3, H, W], got {list(t.shape)}")
    if not t.is_floating_point():
        raise KqlImageError("an image tensor must be float with values in [0, 1] "
                            f"(got {t.dtype}); pass uint8 images as numpy HxWx3 arrays")
    t = t.detach().to("cpu", torch.float32)
    t = t[:3] if t.shape[0] == 4 else t.expand(3, -1, -1) if t.shape[0] == 1 else t
    if not torch.isfinite(t).all():
        raise KqlImageError("the image tensor contains NaN or infinite values")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise KqlImageError("image tensor values must lie in [0, 1] "
                            f"(found {float(t.min()):.3g} .. {float(t.max()):.3g})")
    _check_size(t)
    return t.contiguous()


def _from_array(a: np.ndarray) -> torch.Tensor:
    problem = _array_problem(a.shape, a.dtype)
    if problem:
        raise KqlImageError(f"an image array {problem}")
    a = a[:, :, None] if a.ndim == 2 else a
    a = a[:, :, :3] if a.dtype.isnative else a[:, :, :3].astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint8:
        t = _from_uint8(a)
    else:
        t = torch.from_numpy(np.ascontiguousarray(_as_float(a))).permute(2, 0, 1)
        t = (t.expand(3, -1, -1) if t.shape[0] == 1 else t).contiguous()
    _check_size(t)
    return t


def _array_problem(shape, dtype) -> str | None:
    """Why an array of this shape and dtype is no image (None: it is one)."""
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        return f"must be HxW, HxWx3 or HxWx4, got shape {tuple(shape)}"
    native = np.dtype(dtype).newbyteorder("=")
    if native in (np.uint8, np.uint16, np.bool_) or np.issubdtype(native, np.floating):
        return None
    return f"has an unsupported dtype {np.dtype(dtype)}"


def _from_uint8(a: np.ndarray) -> torch.Tensor:
    """``[3, H, W]`` float from uint8 HxWxC: channels first while still one byte a pixel,
    then one float copy (a PNG read peaks at 16 bytes a pixel, was 29)."""
    with warnings.catch_warnings():     # read-only arrays: .float() always copies
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        t = torch.from_numpy(a).permute(2, 0, 1)
    t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
    return t.contiguous().float().div_(255.0)


def _as_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    f = a.astype(np.float32)
    if a.dtype != np.bool_ and (not np.isfinite(f).all() or (f.size and (f.min() < 0 or f.max() > 1))):
        raise KqlImageError("float image arrays must hold finite values in [0, 1]")
    return f


def _check_size(t: torch.Tensor) -> None:
    if t.shape[1] < 1 or t.shape[2] < 1:
        raise KqlImageError(f"the image is empty ({t.shape[1]}x{t.shape[2]} pixels)")


# -- files ------------------------------------------------------------------------------------

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular_file(path: str, what: str, error: type = KqlImageError):
    """``open(path, "rb")`` once ``os.stat`` says ``path`` is a non-empty regular file: a
    FIFO would block ``open()`` forever, a device never ends. Every refusal is one line
    of ``error``, with ``what`` the file is (``"image file"``, ``"labels file"``).

    >>> open_regular_file("/", "image file")
    Traceback (most recent call last):
    ...
    kql.errors.KqlImageError: '/' is a directory, not an image file
    >>> open_regular_file("/dev/null", "labels file")
    Traceback (most recent call last):
    ...
    kql.errors.KqlImageError: labels file '/dev/null' is a character device, not a regular file
    """
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:
        raise error(_os_problem(exc, path, what)) from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"'{path}' is a directory, not {'an' if what[0] in 'aeiou' else 'a'} {what}")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        raise error(f"{what} '{path}' is {kind}, not a regular file")
    if info.st_size == 0:
        raise error(f"{what} '{path}' is empty (0 bytes)")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise error(_os_problem(exc, path, what)) from None


def _os_problem(exc: Exception, path: str, what: str) -> str:
    """One line for what ``os.stat`` or ``open`` said about ``path``.

    >>> _os_problem(OSError(errno.ELOOP, "Too many levels of symbolic links"), "a.png", "image file")
    "image file 'a.png' is a symlink loop"
    """
    code = getattr(exc, "errno", None)
    if code == errno.ENOENT:
        return f"{what} '{path}' " + ("is a broken symlink" if os.path.islink(path) else "does not exist")
    reasons = {errno.ELOOP: "is a symlink loop", errno.ENOTDIR: "does not exist (a part of its "
               "path is not a directory)", errno.ENAMETOOLONG: "has too long a name"}
    if code in reasons:
        return f"{what} '{path}' {reasons[code]}"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot read {what} '{path}': permission denied"
    return f"cannot read {what} '{path}': {exception_text(exc)}"


def exception_text(exc: BaseException, limit: int = 160, whole: bool = False) -> str:
    """A library's error message as one line of at most ``limit`` characters, without ANSI
    escapes (torch colours some): its first line, or all of them joined (``whole``).

    >>> exception_text(RuntimeError("\\x1b[1mbad\\x1b[0m file\\n\\tdetails"))
    'bad file'
    >>> exception_text(RuntimeError("bad file:\\n\\tdetails"), whole=True)
    'bad file: details'
    """
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else strip_ansi(str(exc))
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
    text = " ".join(lines) if whole else (lines[0] if lines else "")
    return text[:limit] or type(exc).__name__


def check_pixels(path: str, height: int, width: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an image file of no pixels or more than ``max_pixels``, before decoding it.

    >>> check_pixels("big.png", 10000, 10000, 40_000_000)
    Traceback (most recent call last):
    ...
    kql.errors.KqlImageError: image file 'big.png' has 10000x10000 = 100,000,000 pixels, more than max_image_pixels (40,000,000)
    """
    if height < 1 or width < 1:
        raise KqlImageError(f"image file '{path}' is empty ({height}x{width} pixels)")
    if height * width > max_pixels:
        raise KqlImageError(f"image file '{path}' has {height}x{width} = {height * width:,} pixels, "
                            f"more than max_image_pixels ({max_pixels:,})")


def load_file(path: str, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read an image file into ``[3, H, W]``: PNG, JPEG, TIFF, BMP, GIF (its first frame), ...
    via Pillow, or a .npy array (HxW[xC], never unpickled). Its size is read from the
    header first: more than ``max_pixels`` pixels is refused before anything is decoded.
    Pillow's own limit stays above it: it refuses more than twice ``PIL.Image.MAX_IMAGE_PIXELS``
    (179 MP) itself, whatever ``max_pixels`` says.
    """
    with open_regular_file(path, "image file", KqlImageError) as fh:
        numpy_file = fh.read(6) == b"\x93NUMPY"
        fh.seek(0)
        arr = _read_npy(fh, path, max_pixels) if numpy_file else _decode(fh, path, max_pixels)
    return _from_array(arr)


def _decode(fh, path: str, max_pixels: int) -> np.ndarray:
    """Pillow's decoded pixels; every failure one :class:`KqlImageError` line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():     # our limit is checked instead of Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fh) as im:      # lazy: the header only
                check_pixels(path, im.height, im.width, max_pixels)
                im.load()
                return _pixels(im, path)
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
        raise KqlImageError(f"cannot read image file '{path}': corrupt or truncated "
                            f"({exception_text(exc)})") from None


def _pixels(im, path: str) -> np.ndarray:
    """uint8 HxW[xC] (RGB, RGBA or greyscale), uint16 for 16-bit, 32-bit ones stretched to [0, 1]."""
    if im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16, copy=False)
    if im.mode in ("I", "F"):
        return _stretched(np.asarray(im, dtype=np.float32), path)
    if im.mode not in ("RGB", "L", "RGBA"):
        try:
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        except ValueError:
            raise KqlImageError(f"image file '{path}' has pixel mode {im.mode}, which Pillow "
                                "cannot convert to RGB") from None
    return np.asarray(im)


def _stretched(arr: np.ndarray, path: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise KqlImageError(f"image file '{path}' holds NaN or infinite pixel values")
    span = float(arr.max() - arr.min()) or 1.0
    return (arr - arr.min()) / span


def _read_npy(fh, path: str, max_pixels: int) -> np.ndarray:
    """A .npy image: its header's shape, dtype and pixels checked before the data is read."""
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
    problem = _array_problem(shape, dtype)
    if problem:
        raise KqlImageError(f"the array in image file '{path}' {problem}")
    check_pixels(path, shape[0], shape[1], max_pixels)
    fh.seek(0)
    try:
        return np.load(fh, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise KqlImageError(f"cannot read image file '{path}': corrupt or truncated "
                            f"({exception_text(exc)})") from None


def load_sample(name: str) -> torch.Tensor:
    """A photo shipped inside scikit-image (no download), e.g. ``chelsea`` or ``retina``."""
    if name not in SAMPLES:
        import difflib

        hint = difflib.get_close_matches(name, SAMPLES, n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else f"; available: {', '.join(SAMPLES)}"
        raise KqlImageError(f"unknown sample image '{name}'{extra}")
    import skimage.data

    try:
        arr = getattr(skimage.data, name)()
    except Exception as exc:  # skimage raises assorted errors when a file is missing
        raise KqlImageError(f"sample image '{name}' is not available offline ({exc})") from None
    return _from_array(np.asarray(arr))


def target_size(height: int, width: int, input_size) -> tuple[int, int]:
    """None keeps the size; an int is the shorter side (aspect kept); (h, w) is exact.

    >>> target_size(300, 451, 224)
    (224, 337)
    >>> target_size(300, 451, (224, 224)), target_size(5, 7, None)
    ((224, 224), (5, 7))
    """
    if input_size is None:
        return height, width
    if isinstance(input_size, int):
        if height <= width:
            return input_size, max(1, round(width * input_size / height))
        return max(1, round(height * input_size / width)), input_size
    return int(input_size[0]), int(input_size[1])


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a ``[3, H, W]`` image in [0, 1]."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    out = F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out.clamp_(0.0, 1.0).contiguous()
