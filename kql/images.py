"""Images: reading files, skimage samples and user arrays into one form, and resizing.

Every image becomes a float32 tensor ``[3, H, W]`` in pixel space, values in [0, 1].
Greyscale is repeated to three channels; an alpha channel is dropped. :func:`resize`
brings it to the size a model expects (still pixel space, before normalisation).

>>> import numpy as np
>>> to_tensor(np.zeros((4, 5, 3), dtype=np.uint8)).shape
torch.Size([3, 4, 5])
>>> to_tensor(np.full((2, 2), 255, dtype=np.uint8))[:, 0, 0].tolist()
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .errors import KqlImageError

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
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise KqlImageError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    a = a[:, :, :3]
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 65535.0
    elif a.dtype == np.bool_:
        f = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float32)
        if not np.isfinite(f).all() or (f.size and (f.min() < 0 or f.max() > 1)):
            raise KqlImageError("float image arrays must hold finite values in [0, 1]")
    else:
        raise KqlImageError(f"unsupported image array dtype {a.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    _check_size(t)
    return t.contiguous()


def _check_size(t: torch.Tensor) -> None:
    if t.shape[1] < 1 or t.shape[2] < 1:
        raise KqlImageError(f"the image is empty ({t.shape[1]}x{t.shape[2]} pixels)")


def load_file(path: str) -> torch.Tensor:
    """Read an image file (PNG, JPEG, TIFF, BMP, ... via Pillow) into [3, H, W]."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise KqlImageError(f"image file '{path}' does not exist")
    if os.path.isdir(path):
        raise KqlImageError(f"'{path}' is a directory, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "L", "RGBA", "I;16", "I", "F"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            if im.mode in ("I;16", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
                span = float(arr.max() - arr.min()) or 1.0
                arr = (arr - arr.min()) / span
            else:
                arr = np.asarray(im)
    except UnidentifiedImageError:
        raise KqlImageError(f"cannot read image file '{path}': not an image format Pillow knows") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise KqlImageError(f"cannot read image file '{path}': corrupt or truncated ({exc})") from None
    return _from_array(arr)


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
