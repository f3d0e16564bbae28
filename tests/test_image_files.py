"""Image files' contents: the kinds that load (modes, bit depths, frames, .npy arrays) and
the corrupt ones refused in one line (KqlImageError), never with a warning or an unpickled
object; paths with spaces and any script. Every file is made here, in ``tmp_path``."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import kql
from kql.catalog import images
from helpers import Boom, encoded, gradient, png_header, small_cnn_connection, state_dict_of
from helpers import one_line_error as error_of


@pytest.fixture
def con():
    return small_cnn_connection()


# -- image files that load or are refused --------------------------------------------------------

def _frames() -> bytes:
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


PICTURE = gradient()
GOOD = {    # name: (file bytes, (channels, height, width)): grey stays one channel
    "rgb.png": (lambda: encoded(Image.fromarray(PICTURE), "PNG"), (3, 12, 16)),
    "grey.png": (lambda: encoded(Image.fromarray(PICTURE[:, :, 0]), "PNG"), (1, 12, 16)),
    "rgba.png": (lambda: encoded(Image.fromarray(np.dstack([PICTURE, PICTURE[:, :, :1]])), "PNG"),
                 (3, 12, 16)),
    "la.png": (lambda: encoded(Image.fromarray(PICTURE[:, :, 0]).convert("LA"), "PNG"), (1, 12, 16)),
    "palette.png": (lambda: encoded(Image.fromarray(PICTURE).convert("P"), "PNG"), (3, 12, 16)),
    "bilevel.png": (lambda: encoded(Image.fromarray(PICTURE[:, :, 0]).convert("1"), "PNG"), (1, 12, 16)),
    "sixteen.png": (lambda: encoded(Image.fromarray(np.full((5, 7), 32768, np.uint16)), "PNG"), (1, 5, 7)),
    "cmyk.jpg": (lambda: encoded(Image.fromarray(PICTURE).convert("CMYK"), "JPEG"), (3, 12, 16)),
    "rgb.jpg": (lambda: encoded(Image.fromarray(PICTURE), "JPEG"), (3, 12, 16)),
    "animated.gif": (_frames, (3, 6, 8)),
    "one.png": (lambda: encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), (3, 1, 1)),
    "float.tif": (lambda: encoded(Image.fromarray(np.linspace(-5, 5, 20, dtype=np.float32).reshape(4, 5)),
                                  "TIFF"), (1, 4, 5)),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_image_kinds_that_work(con, tmp_path, name):
    make, size = GOOD[name]
    (tmp_path / name).write_bytes(make())
    con.execute(f"LOAD IMAGE i FROM '{tmp_path / name}'")
    image = con.catalog.resolve_image("i")
    assert image.shape == size and image.dtype == torch.float32 and image.is_contiguous()
    assert 0 <= float(image.min()) <= float(image.max()) <= 1


def test_pixel_values(tmp_path):
    (tmp_path / "rgb.png").write_bytes(encoded(Image.fromarray(PICTURE), "PNG"))
    expected = torch.from_numpy(PICTURE).permute(2, 0, 1).float() / 255
    assert torch.equal(images.load_file(str(tmp_path / "rgb.png")), expected)
    (tmp_path / "sixteen.png").write_bytes(GOOD["sixteen.png"][0]())      # scaled, not stretched
    sixteen = images.load_file(str(tmp_path / "sixteen.png"))
    assert sixteen[:, 0, 0].tolist() == pytest.approx([32768 / 65535])
    (tmp_path / "animated.gif").write_bytes(_frames())                     # the first frame
    assert images.load_file(str(tmp_path / "animated.gif"))[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


def _truncated_png() -> bytes:
    data = GOOD["rgb.png"][0]()
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    data = bytearray(GOOD["rgb.png"][0]())
    start = data.index(b"IDAT") + 8
    data[start:start + 20] = bytes(20)               # deflate data and CRC no longer agree
    return bytes(data)


def _nan_tiff() -> bytes:
    return encoded(Image.fromarray(np.full((4, 5), np.nan, np.float32)), "TIFF")


BAD = {
    "truncated.png": (_truncated_png, "corrupt or truncated"),
    "corrupt.png": (_corrupt_png, "corrupt or truncated"),
    "truncated.jpg": (lambda: GOOD["rgb.jpg"][0]()[:200], "corrupt or truncated"),
    "notes.png": (lambda: b"just some text\n", "not an image format Pillow knows"),
    "header-only.png": (lambda: png_header(4, 4), "corrupt or truncated"),
    "nan.tif": (_nan_tiff, "holds NaN or infinite pixel values"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_image_files_that_are_refused_in_one_line(con, tmp_path, name):
    make, expected = BAD[name]
    (tmp_path / name).write_bytes(make())
    assert expected in error_of(con, f"LOAD IMAGE i FROM '{tmp_path / name}'", kql.KqlImageError)


def test_an_image_smaller_than_the_patch_is_a_plan_error(con, tmp_path):
    (tmp_path / "one.png").write_bytes(GOOD["one.png"][0]())
    message = error_of(con, f"OCCLUDE '{tmp_path / 'one.png'}' USING net PATCH 8", kql.KqlPlanError)
    assert "patch 8x8 is larger than the image (1x1" in message


def test_unicode_and_spaces_in_paths(con, tmp_path):
    folder = tmp_path / "dossier été" / "图 片"
    folder.mkdir(parents=True)
    (folder / "chat noir.png").write_bytes(GOOD["rgb.png"][0]())
    torch.save(state_dict_of("squeezenet1_1", num_classes=2), folder / "modèle 1.pt")
    (folder / "étiquettes.txt").write_text("chat\nchien\n", encoding="utf-8")
    con.execute(f"LOAD IMAGE i FROM '{folder / 'chat noir.png'}'; "
                f"LOAD MODEL m FROM '{folder / 'modèle 1.pt'}' ARCH squeezenet1_1 "
                f"LABELS '{folder / 'étiquettes.txt'}'")
    assert con.catalog.resolve_image("i").shape == (3, 12, 16)
    assert con.catalog.resolve_model("m").labels == ["chat", "chien"]


# -- .npy images ----------------------------------------------------------------------------------

def test_npy_images(tmp_path):
    np.save(tmp_path / "rgb.npy", PICTURE)
    assert torch.equal(images.load_file(str(tmp_path / "rgb.npy")), images.to_tensor(PICTURE))
    np.save(tmp_path / "grey.npy", np.linspace(0, 1, 12, dtype=np.float64).reshape(3, 4))
    assert images.load_file(str(tmp_path / "grey.npy")).shape == (1, 3, 4)


def test_an_object_npy_is_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    np.save(tmp_path / "objects.npy", np.array([Boom(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(kql.KqlImageError, match=r"holds Python objects \(dtype object\), which are "
                                                "never unpickled"):
        images.load_file(str(tmp_path / "objects.npy"))
    assert not marker.exists()


@pytest.mark.parametrize("shape,dtype,expected", [
    ((4, 5, 6, 3), np.uint8, "must be HxW, HxWx3 or HxWx4, got shape (4, 5, 6, 3)"),
    ((7,), np.uint8, "got shape (7,)"),
    ((4, 5, 2), np.uint8, "got shape (4, 5, 2)"),
    ((4, 5), np.int64, "has an unsupported dtype int64"),
    ((0, 5), np.uint8, "is empty (0x5 pixels)"),
])
def test_npy_of_the_wrong_shape_or_dtype(tmp_path, shape, dtype, expected):
    np.save(tmp_path / "a.npy", np.zeros(shape, dtype))
    with pytest.raises(kql.KqlImageError) as info:
        images.load_file(str(tmp_path / "a.npy"))
    assert expected in str(info.value)


def test_a_truncated_npy(tmp_path):
    np.save(tmp_path / "a.npy", PICTURE)
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[:-10])
    with pytest.raises(kql.KqlImageError, match="corrupt or truncated"):
        images.load_file(str(tmp_path / "a.npy"))
    (tmp_path / "b.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(kql.KqlImageError, match="not a valid .npy header"):
        images.load_file(str(tmp_path / "b.npy"))


def test_no_warning_reaches_the_user(tmp_path):
    (tmp_path / "rgb.png").write_bytes(GOOD["rgb.png"][0]())
    (tmp_path / "big.png").write_bytes(png_header(10000, 10000))     # over Pillow's warning limit
    readonly = PICTURE.copy()
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images.load_file(str(tmp_path / "rgb.png"))
        images.to_tensor(readonly)
        with pytest.raises(kql.KqlImageError, match="max_image_pixels"):
            images.load_file(str(tmp_path / "big.png"))
