"""Model files as users have them on disk: each loads or is refused in one line
(KqlModelError), never a raw exception, a memory blow-up or code run from a pickle. Every
hostile file is made here, in ``tmp_path``; the image and file-system cases are in
``test_hostile_files`` and ``test_image_files``.
"""

import io
import os
import pickle
import struct
import zipfile
import zlib

import pytest
import torch
import torchvision

import kql
from kql.catalog import models
from helpers import Boom, state_dict_of
from helpers import one_line_error as error_of
from models_zoo import small_cnn
from helpers import deflated


@pytest.fixture
def con():
    c = kql.connect()
    c.register_model("net", small_cnn())
    return c


# -- weights that load but cannot work ---------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(con, tmp_path, bad):
    weights = state_dict_of("squeezenet1_1", num_classes=3)
    weights["features.3.expand1x1.weight"][0, 0, 0, 0] = bad
    torch.save(weights, tmp_path / "bad.pt")
    message = error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'bad.pt'}' ARCH squeezenet1_1",
                       kql.KqlModelError)
    assert message.endswith("has NaN or infinite weights in 'features.3.expand1x1.weight'")


def test_large_finite_weights_are_not_mistaken_for_infinite(tmp_path):
    weights = state_dict_of("squeezenet1_1", num_classes=3)
    weights["features.0.weight"].fill_(3e38)              # their sum overflows to inf
    torch.save(weights, tmp_path / "big.pt")
    assert models.load_model_file("m", str(tmp_path / "big.pt"), "squeezenet1_1").num_classes == 3


@pytest.mark.parametrize("arch,head", [("resnet18", "fc"), ("squeezenet1_1", "classifier.1")])
def test_a_state_dict_of_zero_classes_is_refused_at_load(con, tmp_path, arch, head):
    weights = state_dict_of(arch)
    weights[f"{head}.weight"] = weights[f"{head}.weight"][:0]
    weights[f"{head}.bias"] = weights[f"{head}.bias"][:0]
    torch.save(weights, tmp_path / "zero.pt")
    message = error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'zero.pt'}' ARCH {arch}", kql.KqlModelError)
    assert message.endswith(f"has 0 classes: its last layer '{head}.weight' has no outputs")


def test_a_mismatched_vgg16_is_refused_without_building_it(con, tmp_path, monkeypatch):
    """VGG16 was built twice on the CPU (8-10 s) to say the file does not fit; now once,
    on the meta device: no weight is initialised."""
    initialised = []
    real = torch.nn.init.kaiming_normal_

    def spy(tensor, *args, **kwargs):
        initialised.append(tensor.device.type)
        return real(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", spy)
    torch.save(state_dict_of("squeezenet1_1"), tmp_path / "sq.pt")
    message = error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'sq.pt'}' ARCH vgg16", kql.KqlModelError)
    assert "does not fit vgg16: missing 30 keys" in message
    assert initialised and set(initialised) == {"meta"}


# -- hostile model files -----------------------------------------------------------------------

def _evil_files(tmp_path, marker):
    raw = tmp_path / "raw.pt"                        # a bare pickle: GLOBAL posix.system
    with open(raw, "wb") as fh:
        pickle.dump({"w": Boom(marker)}, fh, protocol=2)
    framed = tmp_path / "framed.pt"                  # protocol 4: opcodes torch refuses
    with open(framed, "wb") as fh:
        pickle.dump({"w": Boom(marker)}, fh, protocol=4)
    zipped = tmp_path / "zipped.pt"                  # torch.save's zip format
    torch.save({"w": Boom(marker)}, zipped)
    return raw, framed, zipped


def test_a_malicious_pickle_never_runs(con, tmp_path):
    marker = tmp_path / "PWNED"
    for path in _evil_files(tmp_path, marker):
        message = error_of(con, f"LOAD MODEL m FROM '{path}' ARCH resnet18", kql.KqlModelError)
        assert "cannot read model file" in message and "never run" in message
        assert "weights_only" not in message         # no advice to turn the protection off
        assert not marker.exists()
    assert "(posix.system)" in error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'raw.pt'}' ARCH resnet18")


def test_wrong_architecture_and_class_counts(con, tmp_path):
    torch.save(state_dict_of("squeezenet1_1"), tmp_path / "sq.pt")
    assert "does not fit resnet18: missing" in error_of(
        con, f"LOAD MODEL m FROM '{tmp_path / 'sq.pt'}' ARCH resnet18", kql.KqlModelError)
    odd = state_dict_of("resnet18", num_classes=7)
    odd["fc.bias"] = torch.zeros(5)                         # 7 class weights, 5 biases
    torch.save(odd, tmp_path / "odd.pt")
    assert "does not fit resnet18: Error(s) in loading state_dict for ResNet: size mismatch for " \
           "fc.bias" in error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'odd.pt'}' ARCH resnet18")
    torch.save(state_dict_of("squeezenet1_1", num_classes=3), tmp_path / "three.pt")
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    assert "has 2 labels but the model has 3 classes" in error_of(
        con, f"LOAD MODEL m FROM '{tmp_path / 'three.pt'}' ARCH squeezenet1_1 "
             f"LABELS '{tmp_path / 'two.txt'}'")


def test_other_non_state_dicts(con, tmp_path):
    torch.save({1: torch.zeros(2)}, tmp_path / "ints.pt")
    assert "does not hold a state dict" in error_of(
        con, f"LOAD MODEL m FROM '{tmp_path / 'ints.pt'}' ARCH resnet18", kql.KqlModelError)
    (tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    assert "cannot read model file" in error_of(
        con, f"LOAD MODEL m FROM '{tmp_path / 'garbage.pt'}' ARCH resnet18", kql.KqlModelError)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(kql.KqlModelError, match="is not UTF-8 text"):
        models.read_labels(str(tmp_path / "latin1.txt"))


def test_a_loaded_model_is_the_one_saved(tmp_path):
    """Built on the meta device and given the file's tensors: the same outputs as the saved
    module; MNASNet's per-module versions (torch.save's ``_metadata``) survive; half
    precision weights make a float32 model."""
    torch.manual_seed(0)
    saved = torchvision.models.mnasnet0_5(weights=None, num_classes=4).eval()
    torch.save(saved.state_dict(), tmp_path / "mnas.pt")
    spec = models.load_model_file("m", str(tmp_path / "mnas.pt"), "mnasnet0_5")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(spec.module(x), saved(x))
    assert all(not t.is_meta for t in spec.module.state_dict().values())
    half = {k: v.half() if v.is_floating_point() else v
            for k, v in state_dict_of("squeezenet1_1", num_classes=2).items()}
    torch.save(half, tmp_path / "half.pt")
    module = models.load_model_file("m", str(tmp_path / "half.pt"), "squeezenet1_1").module
    assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_an_architecture_that_cannot_be_built_on_meta(tmp_path):
    """RegNet computes with its tensors while built: it is built on the CPU instead."""
    torch.save(torchvision.models.regnet_x_400mf(weights=None, num_classes=2).state_dict(),
               tmp_path / "regnet.pt")
    assert models.load_model_file("m", str(tmp_path / "regnet.pt"), "regnet_x_400mf").num_classes == 2


# -- files that inflate past memory_limit (issue 32) ----------------------------------------------

MB = 1 << 20


def zip_of(members) -> bytes:
    """A zip archive written by hand from ``(name, raw deflate data, size, crc32)``: what
    zipfile would write, without compressing gigabytes first."""
    local, central = io.BytesIO(), io.BytesIO()
    for name, data, size, crc in members:
        offset, raw = local.tell(), name.encode()
        local.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size,
                                len(raw), 0) + raw + data)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc,
                                  len(data), size, len(raw), 0, 0, 0, 0, 0, offset) + raw)
    listing, start = central.getvalue(), local.tell()
    return local.getvalue() + listing + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members),
                                                    len(members), len(listing), start, 0)


def deflated_state_dict(weights: dict, zeros: int = 0) -> bytes:
    """``torch.save(weights)`` with every member deflated; with ``zeros``, its largest
    tensor's storage replaced by that many zero bytes (a bomb: 2 GB from 2 MB)."""
    buf = io.BytesIO()
    torch.save(weights, buf)
    archive = zipfile.ZipFile(buf)
    largest = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
    members = []
    for m in archive.infolist():
        data = archive.read(m.filename)
        if zeros and m is largest:
            crc = 0
            for _ in range(zeros // MB):
                crc = zlib.crc32(bytes(MB), crc)
            members.append((m.filename, deflated(b"", zeros), zeros, crc))
        else:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            members.append((m.filename, c.compress(data) + c.flush(), len(data), zlib.crc32(data)))
    return zip_of(members)


def test_a_zip_bomb_state_dict_is_refused_before_torch_load(con, tmp_path, monkeypatch):
    """A 2 MB zip-compressed state dict reached 1.9 GB before it was refused: torch
    allocates each member's declared size and inflates it. The zip's central directory is
    now read first: a 1000:1 archive is a bomb whatever the limit, and the sizes it
    declares must fit memory_limit."""
    weights = state_dict_of("squeezenet1_1", num_classes=2)           # 2.9 MB
    (tmp_path / "ok.pt").write_bytes(deflated_state_dict(weights))
    (tmp_path / "bomb.pt").write_bytes(deflated_state_dict(weights, 2048 * MB))
    size = (tmp_path / "bomb.pt").stat().st_size
    declared = sum(m.file_size for m in zipfile.ZipFile(tmp_path / "bomb.pt").infolist())
    assert size < 3 * MB and declared > 2048 * MB
    con.execute(f"LOAD MODEL ok FROM '{tmp_path / 'ok.pt'}' ARCH squeezenet1_1")    # deflated: read
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))
    message = error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'bomb.pt'}' ARCH squeezenet1_1",
                       kql.KqlModelError)
    assert message == (f"line 1, column 1: model file '{tmp_path / 'bomb.pt'}' is a zip bomb: its "
                       f"members declare 2.0 GB from a 2.0 MB file ({declared // size:,}:1;"
                       " weights barely compress): refused unread"), message
    con.execute("SET memory_limit = '2 MB'")
    message = error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'ok.pt'}' ARCH squeezenet1_1",
                       kql.KqlModelError)
    assert message.endswith(f"model file '{tmp_path / 'ok.pt'}' would take 2.8 MB in memory (its "
                            "zip archive's members uncompressed), more than memory_limit (2.0 MB)")


def test_a_zip_member_that_declares_more_than_deflate_makes_is_damaged(tmp_path):
    member = ("archive/data/0", zlib.compressobj(9, zlib.DEFLATED, -15).compress(b"") + b"\x03\x00",
              1 << 30, 0)
    (tmp_path / "lying.pt").write_bytes(zip_of([member]))
    with pytest.raises(kql.KqlModelError, match=r"damaged zip archive \(member 'archive/data/0' "
                                                r"declares 1,073,741,824 bytes from 2, more than deflate inflates to\)"):
        models.load_model_file("m", str(tmp_path / "lying.pt"), "squeezenet1_1")


def onnx_net(path, nodes, inputs, initializers=()) -> str:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, inputs)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def test_an_onnx_graph_that_makes_a_huge_tensor_is_refused_at_load(con, tmp_path):
    """A Tile with constant repeats turns a 3x8x8 image into 2 x 3x16000x16000 floats
    (6 GB) in the probe pass at LOAD MODEL: sized by ONNX's shape inference first."""
    import numpy as np
    from onnx import helper, numpy_helper

    def tiled(name: str, repeats: int):
        reps = numpy_helper.from_array(np.array([1, 1, repeats, repeats], np.int64), "reps")
        return onnx_net(tmp_path / name, [helper.make_node("Tile", ["x", "reps"], ["t"]),
                                          helper.make_node("GlobalAveragePool", ["t"], ["p"]),
                                          helper.make_node("Flatten", ["p"], ["y"])],
                        ["n", 3, 8, 8], [reps])
    con.execute("SET memory_limit = '1 GB'")
    message = error_of(con, f"LOAD MODEL m FROM '{tiled('tile.onnx', 2000)}'", kql.KqlModelError)
    assert message.endswith("would take 5.7 GB in memory (the largest tensor of the ONNX graph on "
                            "two 8x8 images), more than memory_limit (1.0 GB)")
    assert "(onnx, 3 classes)" in con.execute(f"LOAD MODEL s FROM '{tiled('small.onnx', 2)}'").message


def test_an_onnx_file_over_memory_limit_is_refused_before_parsing(con, tmp_path):
    import numpy as np
    from onnx import helper, numpy_helper

    weights = numpy_helper.from_array(np.zeros((3, 3, 256, 1024), np.float32), "w")    # 9 MB
    path = onnx_net(tmp_path / "big.onnx", [helper.make_node("Add", ["x", "w"], ["a"]),
                                             helper.make_node("GlobalAveragePool", ["a"], ["p"]),
                                             helper.make_node("Flatten", ["p"], ["y"])],
                    ["n", 3, 256, 1024], [weights])
    con.execute("SET memory_limit = '16 MB'")
    message = error_of(con, f"LOAD MODEL m FROM '{path}'", kql.KqlModelError)
    assert message.endswith("would take 27.0 MB in memory (an ONNX model, with its external data, "
                            "parsed, checked and converted), more than memory_limit (16.0 MB)")
