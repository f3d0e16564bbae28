"""Images: reading files, skimage samples and user arrays into one form, and resizing.

Every image becomes a float32 tensor ``[C, H, W]`` in pixel space, values in [0, 1], that
keeps its own channels: grey (and grey with alpha) is ``C = 1``, colour ``C = 3``; alpha is
dropped, palette, CMYK, YCbCr and LAB become RGB. The planner gives a model the channels
its first layer takes (:func:`match_channels`) and :func:`resize` the size it expects
(still pixel space, before normalisation). Integer pixels are divided by their largest
value (255, 65535 for 16 bits), whatever the image holds; DICOM scans are rescaled and
windowed. :func:`read_image` knows a file's kind from its content and hands it to a
decoder: Pillow's kinds and .npy in :mod:`kql.catalog.image_formats`, DICOM in :mod:`kql.catalog.dicom`.

Files are checked before they are read: a regular file (a FIFO would block ``open()``
forever), its size from the header (Pillow opens lazily; a .npy header is read alone;
a DICOM header is read without its pixel data) against ``max_pixels``, and a .npy never
unpickles (``allow_pickle=False``).

>>> import numpy as np
>>> to_tensor(np.zeros((4, 5, 3), dtype=np.uint8)).shape
torch.Size([3, 4, 5])
>>> to_tensor(np.full((2, 2), 255, dtype=np.uint8)).shape
torch.Size([1, 2, 2])
>>> to_tensor(np.full((2, 2, 4), 65535, dtype=np.uint16))[:, 0, 0].tolist()   # alpha dropped
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import stat
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import KqlImageError, strip_ansi

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
    """A user image as ``[C, H, W]``: a torch float tensor in [0, 1] (``[H, W]``, ``[1, H, W]``,
    ``[3, H, W]``, or ``[4, H, W]`` whose alpha is dropped) or a numpy HxW, HxWx1, HxWx3 or
    HxWx4 array (uint8, uint16, bool or float in [0, 1]).

    >>> to_tensor(torch.rand(2, 3)).shape, to_tensor(torch.rand(4, 2, 3)).shape
    (torch.Size([1, 2, 3]), torch.Size([3, 2, 3]))
    """
    if isinstance(image, torch.Tensor):
        return _from_tensor(image)
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise KqlImageError(f"an image must be a torch tensor or a numpy array, not {type(image).__name__}")


def _from_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise KqlImageError("an image tensor must have shape [3, H, W] (colour), [1, H, W] or "
                            f"[H, W] (grey), got {list(t.shape)}")
    if not t.is_floating_point():
        raise KqlImageError("an image tensor must be float with values in [0, 1] "
                            f"(got {t.dtype}); pass uint8 images as numpy HxWx3 arrays")
    t = t.detach().to("cpu", torch.float32)
    t = t[:3] if t.shape[0] == 4 else t
    if not torch.isfinite(t).all():
        raise KqlImageError("the image tensor contains NaN or infinite values")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise KqlImageError("image tensor values must lie in [0, 1] "
                            f"(found {float(t.min()):.3g} .. {float(t.max()):.3g})")
    _check_size(t)
    return t.contiguous()


def _from_array(a: np.ndarray) -> torch.Tensor:
    problem = array_problem(a.shape, a.dtype)
    if problem:
        raise KqlImageError(f"an image array {problem}")
    a = a[:, :, None] if a.ndim == 2 else a
    a = a[:, :, :3] if a.dtype.isnative else a[:, :, :3].astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint8:
        t = _from_uint8(a)
    else:
        t = torch.from_numpy(np.ascontiguousarray(_as_float(a))).permute(2, 0, 1).contiguous()
    _check_size(t)
    return t


def array_problem(shape, dtype) -> str | None:
    """Why an array of this shape and dtype is no image (None: it is one)."""
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        return f"must be HxW, HxWx3 or HxWx4, got shape {tuple(shape)}"
    native = np.dtype(dtype).newbyteorder("=")
    if native in (np.uint8, np.uint16, np.bool_) or np.issubdtype(native, np.floating):
        return None
    return f"has an unsupported dtype {np.dtype(dtype)}"


def _from_uint8(a: np.ndarray) -> torch.Tensor:
    """``[C, H, W]`` float from uint8 HxWxC: channels first while still one byte a pixel,
    then one float copy (a PNG read peaks at 16 bytes a pixel, was 29)."""
    with warnings.catch_warnings():     # read-only arrays: .float() always copies
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        t = torch.from_numpy(a).permute(2, 0, 1)
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


# -- memory: what a file may take once decoded or inflated -------------------------------------

# The statement's SET memory_limit while it runs (:func:`memory_limit`); 'auto' otherwise.
_MEMORY_LIMIT: contextvars.ContextVar = contextvars.ContextVar("kql_memory_limit", default="auto")


@contextlib.contextmanager
def memory_limit(setting):
    """Hold the files read inside to ``setting`` (a ``SET memory_limit`` value)."""
    token = _MEMORY_LIMIT.set(setting)
    try:
        yield
    finally:
        _MEMORY_LIMIT.reset(token)


def reading_limit(limit: Optional[int] = None) -> int:
    """The bytes a file may take once decoded or inflated: ``limit``, else the running
    statement's ``memory_limit`` ('auto': a quarter of the memory available).

    >>> with memory_limit("1 GB"):
    ...     reading_limit(), reading_limit(5)
    (1073741824, 5)
    """
    from ..planner.memory import allowed

    return int(limit) if limit is not None else allowed(_MEMORY_LIMIT.get(), "cpu")


def check_bytes(path: str, what: str, needed: int, limit: int, why: str = "",
                error: type = KqlImageError, more: bool = False) -> None:
    """Refuse a file that would take ``needed`` bytes (``more``: at least), ``why``, past
    ``limit``, before it is decoded or inflated; ``what`` the file is.

    >>> check_bytes("scan.dcm", "image file", 3 << 30, 1 << 30, "its data set inflated", more=True)
    Traceback (most recent call last):
    ...
    kql.errors.KqlImageError: image file 'scan.dcm' would take more than 3.0 GB in memory (its data set inflated), more than memory_limit (1.0 GB)
    """
    if needed <= limit:
        return
    from ..planner.memory import size_text

    because = f" ({why})" if why else ""
    raise error(f"{what} '{path}' would take {'more than ' if more else ''}{size_text(needed)} "
                f"in memory{because}, more than memory_limit ({size_text(limit)})")


class LoadedImage(NamedTuple):
    """An image file's pixels ``[C, H, W]`` and what its header says: always ``format``; for
    Pillow's kinds ``mode`` and ``bits``; for DICOM also ``pixel_spacing`` (mm, row and
    column), ``window`` (center, width: None when min-max was used), ``rescale``, ..."""

    tensor: torch.Tensor
    info: dict


def read_image(path: str, *, max_pixels: int = MAX_PIXELS, memory_limit: Optional[int] = None) -> LoadedImage:
    """Read an image file, its kind known from its content, not its name: PNG, JPEG, TIFF
    (its first page), BMP, GIF (its first frame), ... via Pillow; DICOM (its first frame)
    via pydicom; or a .npy array (HxW[xC], never unpickled); or a volume ``[C, D, H, W]``:
    a NIfTI file or a folder of DICOM slices (:mod:`.volumes`). Its size is read from the
    header first: more than ``max_pixels`` pixels, or more bytes decoded (or inflated)
    than ``memory_limit`` (default: the statement's ``SET memory_limit``), is refused
    before anything is decoded.
    Pillow's own limit stays above it: it refuses more than twice ``PIL.Image.MAX_IMAGE_PIXELS``
    (179 MP) itself, whatever ``max_pixels`` says.

    >>> import tempfile, PIL.Image
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     PIL.Image.fromarray(np.full((2, 3), 65535, np.uint16)).save(f"{folder}/a.png")
    ...     image = read_image(f"{folder}/a.png")
    >>> image.tensor.shape, float(image.tensor.max()), image.info
    (torch.Size([1, 2, 3]), 1.0, {'format': 'PNG', 'mode': 'I;16', 'bits': 16})
    """
    from . import volumes

    limit = reading_limit(memory_limit)
    if os.path.isdir(path) and volumes.holds_dicom(path):      # a DICOM series
        loaded = volumes.read_dicom_series(path, max_pixels, limit)
        return LoadedImage(loaded.tensor, dict(loaded.info))
    with open_regular_file(path, "image file", KqlImageError) as fh:
        head = fh.read(volumes.HEAD_BYTES)
        fh.seek(0)
        if not volumes.is_nifti(head):
            from . import dicom, image_formats as formats

            read = (formats.read_npy if head.startswith(b"\x93NUMPY") else
                    dicom.read_dicom if dicom.is_dicom(head) else formats.decode)
            arr, info = read(fh, path, max_pixels, limit)
            return LoadedImage(_from_array(arr), info)
    loaded = volumes.read_nifti(path, max_pixels, limit)        # a NIfTI volume
    return LoadedImage(loaded.tensor, dict(loaded.info))


def load_file(path: str, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The ``[C, H, W]`` pixels of an image file (see :func:`read_image`)."""
    return read_image(path, max_pixels=max_pixels).tensor


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


# ITU-R BT.601 luma, what Pillow's convert("L") uses.
LUMA = (0.299, 0.587, 0.114)


def match_channels(image: torch.Tensor, channels: int) -> tuple[torch.Tensor, str | None]:
    """``image`` [C, H, W] with the ``channels`` the model's first layer takes, and what was
    done to it (None: nothing): grey repeated to RGB, RGB to grey by its luma; any other
    pair is left as it is.

    >>> t, note = match_channels(torch.ones(1, 2, 2), 3)
    >>> tuple(t.shape), note
    ((3, 2, 2), 'grey image repeated to 3 channels')
    >>> t, note = match_channels(torch.ones(3, 2, 2), 1)
    >>> tuple(t.shape), round(float(t.max()), 6), note
    ((1, 2, 2), 1.0, 'RGB image converted to grey (luma)')
    """
    have = int(image.shape[0])
    if have == 1 and channels == 3:
        return image.expand(3, -1, -1).contiguous(), "grey image repeated to 3 channels"
    if have == 3 and channels == 1:
        luma = torch.tensor(LUMA, dtype=image.dtype).view(3, 1, 1)
        return (image * luma).sum(0, keepdim=True).clamp_(0.0, 1.0), "RGB image converted to grey (luma)"
    # Equal, or a count no photo has: the model's own first layer says whether it fits
    # (the first convolution found among its modules need not be the first one run).
    return image, None


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a ``[C, H, W]`` image in [0, 1]."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    out = F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out.clamp_(0.0, 1.0).contiguous()
