"""Image, model and labels files that would exhaust memory or are no plain readable file:
pixel counts or inflated sizes over max_image_pixels / memory_limit, decompression bombs,
FIFOs, devices, sockets, empty files, permissions, symlinks. Each is refused in one line
(KqlImageError / KqlModelError), never a raw exception, a hang or a memory blow-up. Every
hostile file is made here, in ``tmp_path``; the image kinds that load, and the files refused
for their contents, are in ``test_image_files``.
"""

import contextlib
import errno
import io
import os
import signal
import socket
import struct
import tempfile
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import kql
from kql.catalog import images, models
from helpers import MB, deflated, encoded, gradient, png_chunk, png_header, small_cnn_connection
from helpers import one_line_error as error_of


@pytest.fixture
def con():
    return small_cnn_connection()


@contextlib.contextmanager
def deadline(seconds=10):
    """Fail instead of hanging: a blocking open() is interrupted by the alarm."""
    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- making files ------------------------------------------------------------------------------

def npy_header(shape, descr="|u1") -> bytes:
    """A .npy file of its header alone, claiming ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


# -- 1. images that would exhaust memory ---------------------------------------------------------

def test_a_50000x50000_header_is_refused_without_pillow_noise(con, tmp_path, capfd):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(50000, 50000))
    message = error_of(con, f"LOAD IMAGE b FROM '{bomb}'", kql.KqlImageError)
    assert message.endswith("has 2,500,000,000 pixels, more than max_image_pixels (64,000,000)")
    assert "Decompression" not in capfd.readouterr().err


def test_an_image_over_the_limit_is_refused_from_its_header(con, tmp_path, capfd):
    # Below Pillow's own error limit, above KQL's: decoding it would take 3.5 GB (10000x10000).
    big = tmp_path / "big.png"
    big.write_bytes(png_header(10000, 10000))        # no pixel data: a decoder would fail
    message = error_of(con, f"LOAD IMAGE b FROM '{big}'", kql.KqlImageError)
    assert message.endswith("has 10000x10000 = 100,000,000 pixels, more than max_image_pixels "
                            "(64,000,000)")
    assert capfd.readouterr().err == ""


def test_max_pixels_is_a_keyword_of_load_file(tmp_path):
    path = tmp_path / "small.png"
    path.write_bytes(encoded(Image.fromarray(gradient(12, 16)), "PNG"))
    assert images.load_file(str(path), max_pixels=192).shape == (3, 12, 16)
    with pytest.raises(kql.KqlImageError, match=r"12x16 = 192 pixels, more than max_image_pixels \(191\)"):
        images.load_file(str(path), max_pixels=191)


def test_a_huge_npy_is_refused_from_its_header(tmp_path):
    path = tmp_path / "huge.npy"
    path.write_bytes(npy_header((100000, 100000, 3)))     # 30 GB claimed, none there
    with pytest.raises(kql.KqlImageError, match="100000x100000 = 10,000,000,000 pixels"):
        images.load_file(str(path))


def test_the_session_sets_the_pixel_limit(con, tmp_path):
    path = tmp_path / "forty.png"
    Image.fromarray(gradient(40, 40)).save(path)
    con.execute(f"LOAD IMAGE ok FROM '{path}'")                 # 1,600 pixels: within the default
    con.execute("SET max_image_pixels = 1000")
    for query in (f"LOAD IMAGE small FROM '{path}'",
                  f"EXPLAIN OCCLUDE '{path}' USING net PATCH 8 STRIDE 8"):
        message = str(error_of(con, query, kql.KqlImageError))
        assert "1,600 pixels" in message and "max_image_pixels (1,000)" in message, message
    assert "max_image_pixels must be" in str(error_of(con, "SET max_image_pixels = 0", kql.KqlPlanError))


# -- 1b. files that inflate past memory_limit (issue 32) -----------------------------------------



def dicom_element(group: int, element: int, vr: bytes, value: bytes = b"", length=None) -> bytes:
    """One Explicit VR Little Endian element; ``length`` for a value that follows apart."""
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"UN"):
        return struct.pack("<HH", group, element) + vr + struct.pack("<HI", 0, size) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", size) + value


def deflated_dicom(private: int = 0, rows: int = 16, frames: int = 1) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of ``frames`` 8-bit frames of rows x rows
    zero pixels, after a private OB element of ``private`` zero bytes."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    group_length = struct.unpack("<I", buf.getvalue()[140:144])[0]
    meta = buf.getvalue()[:144 + group_length]         # preamble, DICM, file meta
    us = lambda g, e, v: dicom_element(g, e, b"US", struct.pack("<H", v))  # noqa: E731
    head = (dicom_element(0x0008, 0x0016, b"UI", SecondaryCaptureImageStorage.encode() + b"\0")
            + dicom_element(0x0009, 0x0010, b"LO", b"KQL TEST")
            + dicom_element(0x0009, 0x1010, b"OB", length=private))
    pixels = rows * rows * frames
    middle = (us(0x0028, 0x0002, 1) + dicom_element(0x0028, 0x0004, b"CS", b"MONOCHROME2 ")
              + dicom_element(0x0028, 0x0008, b"IS", str(frames).encode().ljust(len(str(frames)) + len(str(frames)) % 2))
              + us(0x0028, 0x0010, rows) + us(0x0028, 0x0011, rows) + us(0x0028, 0x0100, 8)
              + us(0x0028, 0x0101, 8) + us(0x0028, 0x0102, 7) + us(0x0028, 0x0103, 0)
              + dicom_element(0x7FE0, 0x0010, b"OB", length=pixels))
    return meta + deflated(head, private, middle, pixels)


@contextlib.contextmanager
def python_peak():
    """The peak of Python's allocations inside (bytes objects: what inflating makes)."""
    tracemalloc.start()
    seen = {}
    try:
        yield seen
    finally:
        seen["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def test_a_small_deflated_dicom_loads(tmp_path):
    """The files of the next test, small: they are read (two frames, the first one given)."""
    path = tmp_path / "small.dcm"
    path.write_bytes(deflated_dicom(private=MB, rows=16, frames=2))
    loaded = images.read_image(str(path), memory_limit=64 * MB)
    assert loaded.tensor.shape == (1, 16, 16) and loaded.info["frames"] == 2
    assert loaded.info["transfer_syntax"] == "Deflated Explicit VR Little Endian"
    with pytest.raises(kql.KqlImageError, match=r"inflates to 1\.0 MB, held twice while read\), "
                                                r"more than memory_limit \(1\.0 MB\)"):
        images.read_image(str(path), memory_limit=MB)


@pytest.mark.parametrize("private,rows,frames", [(2048 * MB, 16, 1), (0, 1024, 2048)],
                         ids=["large-private-element", "large-pixel-data"])
def test_a_deflated_dicom_bomb_is_refused_while_inflating(con, tmp_path, private, rows, frames):
    """1.5 MB DICOMs of the deflated transfer syntax loaded with 5.4-6.9 GB peak memory:
    pydicom inflates a data set in one call. Now it is inflated a chunk at a time, counted,
    never kept, and refused past memory_limit. These inflate to 2 GB."""
    path = tmp_path / "bomb.dcm"
    path.write_bytes(deflated_dicom(private, rows, frames))
    assert path.stat().st_size < 3 * MB
    with python_peak() as seen, pytest.raises(kql.KqlImageError) as err:
        images.read_image(str(path), memory_limit=64 * MB)
    assert seen["peak"] < 32 * MB, seen                 # a few chunks, not 2 GB (nor 64 MB)
    assert str(err.value) == (f"image file '{path}' would take more than 256.0 MB in memory (its "
                              "deflated DICOM data set inflates to more than 128.0 MB, held "
                              "twice while read), more than memory_limit (64.0 MB)")
    con.execute("SET memory_limit = '64 MB'")           # the statement's setting holds it
    message = error_of(con, f"LOAD IMAGE b FROM '{path}'", kql.KqlImageError)
    assert message.endswith("more than memory_limit (64.0 MB)")


def jpeg_dicom(jpeg: bytes, rows: int) -> bytes:
    """A JPEG Baseline DICOM whose header says rows x rows grey pixels, of ``jpeg``."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_jpeg_frame_larger_than_its_dicom_header_is_refused_undecoded(tmp_path):
    """A JPEG decoder follows the codestream, not Rows x Columns: a 16x16 scan whose JPEG
    says 4000x4000 would decode 16 megapixels (up to Pillow's 179)."""
    small = encoded(Image.fromarray(gradient(16, 16)[:, :, 0]), "JPEG")
    (tmp_path / "ok.dcm").write_bytes(jpeg_dicom(small, 16))
    assert images.read_image(str(tmp_path / "ok.dcm")).tensor.shape == (1, 16, 16)
    big = encoded(Image.new("L", (4000, 4000)), "JPEG")
    (tmp_path / "big.dcm").write_bytes(jpeg_dicom(big, 16))
    with pytest.raises(kql.KqlImageError) as err:
        images.read_image(str(tmp_path / "big.dcm"))
    assert str(err.value) == (f"image file '{tmp_path / 'big.dcm'}' holds a 4000x4000 JPEG "
                              "Baseline (Process 1) frame but its DICOM header says 16x16: "
                              "refused undecoded")


@pytest.mark.parametrize("chunk", [b"zTXt", b"iCCP"])
def test_a_png_text_or_icc_bomb_is_refused_unread(tmp_path, chunk):
    """Pillow inflates at most 1 MB a chunk: a 512 MB zTXt or iCCP is one line, not a
    'corrupt or truncated' file."""
    plain = encoded(Image.fromarray(gradient(4, 4)), "PNG")
    bomb = b"\x78\xda" + deflated(b"", 512 * MB) + bytes(4)       # zlib: header, data, check
    path = tmp_path / "bomb.png"
    path.write_bytes(plain[:33] + png_chunk(chunk, b"name\0\0" + bomb) + plain[33:])
    with python_peak() as seen, pytest.raises(kql.KqlImageError) as err:
        images.read_image(str(path))
    assert seen["peak"] < 32 * MB
    assert str(err.value) == (f"image file '{path}' has a compressed chunk (text or ICC profile) "
                              "that inflates to more than Pillow's limit (1.0 MB a chunk, 64.0 "
                              "MB of text in all): refused unread")


def test_decoding_over_memory_limit_is_refused_from_the_header(tmp_path):
    """Within max_image_pixels, over memory_limit: refused before Pillow decodes; a .npy
    whose header claims more than its file holds is refused before numpy allocates it."""
    path = tmp_path / "big.png"
    path.write_bytes(png_header(4000, 3000))        # no pixel data: a decoder would fail
    with pytest.raises(kql.KqlImageError) as err:
        images.read_image(str(path), memory_limit=64 * MB)
    assert str(err.value) == (f"image file '{path}' would take 206.0 MB in memory (its pixels "
                              "decoded, then as floats), more than memory_limit (64.0 MB)")
    lying = tmp_path / "lying.npy"
    lying.write_bytes(npy_header((6000, 6000, 3), "<f8") + bytes(64))
    with pytest.raises(kql.KqlImageError, match=r"corrupt or truncated \(its header says "
                                                r"864,000,000 bytes of pixels, the file holds 64\)"):
        images.read_image(str(lying))
    np.save(tmp_path / "ok.npy", np.zeros((1000, 1000, 3), np.float32))
    with pytest.raises(kql.KqlImageError, match=r"would take 22\.9 MB in memory \(its array, then "
                                                r"as floats\), more than memory_limit \(16\.0 MB\)"):
        images.read_image(str(tmp_path / "ok.npy"), memory_limit=16 * MB)
    assert images.read_image(str(tmp_path / "ok.npy"), memory_limit=32 * MB).tensor.shape == (3, 1000, 1000)


# -- 2. files that block open() or are no files -------------------------------------------------

def test_a_fifo_never_blocks(con, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with deadline():
        for query, cls in [(f"LOAD IMAGE i FROM '{fifo}'", kql.KqlImageError),
                           (f"LOAD MODEL m FROM '{fifo}' ARCH squeezenet1_1", kql.KqlModelError),
                           (f"OCCLUDE '{fifo}' USING net", kql.KqlImageError)]:
            assert "is a FIFO (named pipe), not a regular file" in error_of(con, query, cls)


def test_a_fifo_as_labels_never_blocks(tmp_path):
    fifo = tmp_path / "labels"
    os.mkfifo(fifo)
    with deadline(), pytest.raises(kql.KqlModelError, match="is a FIFO"):
        models.read_labels(str(fifo), 3)


def test_directories_devices_and_sockets(con, tmp_path):
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    assert "is a directory, not a model file" in error_of(
        con, f"LOAD MODEL m FROM '{folder}' ARCH squeezenet1_1", kql.KqlModelError)
    assert "is a directory, not an image file" in error_of(con, f"LOAD IMAGE i FROM '{folder}'")
    with pytest.raises(kql.KqlModelError, match="is a directory, not a labels file"):
        models.read_labels(str(folder))
    assert "is a character device" in error_of(con, "LOAD IMAGE i FROM '/dev/zero'")
    with tempfile.TemporaryDirectory() as short:        # a socket path must be short
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.path.join(short, "s"))
        try:
            assert "is a socket" in error_of(con, f"LOAD IMAGE i FROM '{short}/s'")
        finally:
            sock.close()


def test_empty_files(con, tmp_path):
    for name, query, cls in [("e.png", "LOAD IMAGE i FROM '{}'", kql.KqlImageError),
                             ("e.pt", "LOAD MODEL m FROM '{}' ARCH squeezenet1_1", kql.KqlModelError)]:
        (tmp_path / name).write_bytes(b"")
        assert error_of(con, query.format(tmp_path / name), cls).endswith("is empty (0 bytes)")


# -- 3. permissions, symlinks, ANSI -------------------------------------------------------------

def test_permission_denied_is_said(con, tmp_path, monkeypatch):
    locked = tmp_path / "locked.png"
    locked.write_bytes(encoded(Image.fromarray(gradient()), "PNG"))
    locked.chmod(0)
    if os.geteuid() == 0:                       # root reads it anyway: make open() refuse
        def refuse(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        monkeypatch.setattr(images, "open", refuse, raising=False)
    assert error_of(con, f"LOAD IMAGE i FROM '{locked}'").endswith(": permission denied")
    assert error_of(con, f"LOAD MODEL m FROM '{locked}' ARCH resnet18").endswith(": permission denied")


def test_symlink_loops_and_broken_links(con, tmp_path):
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    assert error_of(con, f"LOAD IMAGE i FROM '{tmp_path / 'a.png'}'").endswith("is a symlink loop")
    assert error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'a.png'}' ARCH resnet18").endswith(
        "is a symlink loop")
    assert error_of(con, f"LOAD IMAGE i FROM '{tmp_path / 'dangling.png'}'").endswith(
        "is a broken symlink")


def test_torch_ansi_codes_never_reach_the_message(con, tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")    # torch's refusal is in bold
    message = error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'whole.pt'}' ARCH resnet18")
    assert "(torch.nn.modules.linear.Linear), which are never run" in message
