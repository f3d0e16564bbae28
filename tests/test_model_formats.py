"""Model files as users have them: ONNX and TorchScript; each file made here (nothing
downloaded), each kind told from its content, and found again by a later session. State
dicts (safetensors, timm, the user's factory) and pickles are in ``test_state_dicts``.

Where maps are compared, two engines are compared on the same model elementwise, and the
map must move (a broken engine on a flat map would pass).
"""

import os
import re
import shutil
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import kql
from helpers import image_connection as connection
from helpers import incremental_equals_naive, moving, plain_heatmap, smooth_noise_image
from helpers import model_error as error_of
from models_zoo import sensitive_small_cnn

SIZE = (24, 30)                     # the image sensitive_small_cnn is made sensitive on
BLACK = (0.0, 0.0, 0.0)


def export_onnx(model: nn.Module, path, size=SIZE, dynamic=(0,), **options) -> str:
    """``model`` as an ONNX file (the TorchScript-based exporter: no onnxscript needed);
    ``dynamic``: the input's dynamic dimensions (0: the batch)."""
    axes = {"x": {d: f"d{d}" for d in dynamic}, "y": {0: "d0"} if 0 in dynamic else {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.rand(1, 3, *size),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes=axes, **options)
    return str(path)


def onnxruntime_logits(path: str, x: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


@pytest.fixture(scope="module")
def model():
    return sensitive_small_cnn()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "net.onnx", opset_version=17)


# -- ONNX ------------------------------------------------------------------------------------

def test_onnx_equals_onnxruntime_and_runs_incrementally(model, onnx_file):
    con = connection()
    assert con.execute(f"LOAD MODEL net FROM '{onnx_file}'").message == "model 'net' loaded (onnx, 5 classes)"
    spec = con.catalog.resolve_model("net")
    assert isinstance(spec.module, torch.fx.GraphModule)
    assert (spec.arch, spec.mean, spec.std, spec.input_size, spec.channels) == ("onnx", None, None, SIZE, 3)
    x = torch.rand(4, 3, *SIZE)
    with torch.no_grad():
        ours = spec.module(x).numpy()
    np.testing.assert_allclose(ours, onnxruntime_logits(onnx_file, x), atol=1e-4)
    slow = incremental_equals_naive(con, "OCCLUDE img USING net PATCH 6 STRIDE 3 COLOR (0, 0, 0)")
    ref, _ = plain_heatmap(model, smooth_noise_image(*SIZE), (6, 6), (3, 3), BLACK)
    np.testing.assert_allclose(slow, ref, atol=1e-4)


def test_onnx_is_told_by_its_content_not_its_name(onnx_file, tmp_path):
    shutil.copy(onnx_file, tmp_path / "model.bin")
    con = connection()
    assert "(onnx, 5 classes)" in con.execute(f"LOAD MODEL m FROM '{tmp_path / 'model.bin'}'").message
    assert "(onnx, 5 classes)" in con.execute(f"LOAD MODEL m FROM '{onnx_file}' ARCH onnx").message


def test_onnx_of_any_image_size_keeps_the_images_size(model, tmp_path):
    path = export_onnx(model, tmp_path / "any.onnx", dynamic=(0, 2, 3), opset_version=17)
    image = smooth_noise_image(20, 28)
    con = connection(image=image)
    con.execute(f"LOAD MODEL m FROM '{path}'")
    spec = con.catalog.resolve_model("m")
    assert (spec.input_size, spec.num_classes) == (None, 5)
    ref, _ = plain_heatmap(model, image, (8, 8), (4, 4), BLACK)
    np.testing.assert_allclose(con.execute("OCCLUDE img USING m PATCH 8 STRIDE 4 COLOR (0, 0, 0)").heatmap,
                               ref, atol=1e-4)


class Reshaping(nn.Module):
    """``x.reshape(x.shape[0], -1)``: exported with Shape/Gather/Constant nodes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.fc = nn.Conv2d(3, 4, 3, stride=2), nn.Linear(4 * 11 * 14, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).reshape(x.shape[0], -1))


def test_a_newer_opset_is_converted_down_for_onnx2torch(tmp_path):
    """onnx2torch 1.5 lacks Constant 19: the model is converted to opset 18 first."""
    path = export_onnx(Reshaping(), tmp_path / "new.onnx", opset_version=20)
    spec = kql.catalog.models.load_model_file("m", path)
    x = torch.rand(3, 3, *SIZE)
    with torch.no_grad():
        np.testing.assert_allclose(spec.module(x).numpy(), onnxruntime_logits(path, x), atol=1e-4)
    assert spec.num_classes == 6


def test_onnx_files_that_cannot_be_used(tmp_path, onnx_file, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    con = connection()
    data = open(onnx_file, "rb").read()
    (tmp_path / "cut.onnx").write_bytes(data[:len(data) // 2])
    assert f"cannot read model file '{tmp_path / 'cut.onnx'}' as ONNX: " in error_of(
        con, f"LOAD MODEL m FROM '{tmp_path / 'cut.onnx'}'")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "hard.onnx")
    assert error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'hard.onnx'}'").endswith(
        "uses operator Hardmax (version 13), which onnx2torch cannot convert to PyTorch")
    fixed = export_onnx(Reshaping(), tmp_path / "fixed.onnx", dynamic=(), opset_version=17)
    assert "runs on one image at a time only (its graph fixes the batch size at 1)" in error_of(
        con, f"LOAD MODEL m FROM '{fixed}'")
    assert "is an ONNX model, which says its own architecture" in error_of(
        con, f"LOAD MODEL m FROM '{onnx_file}' ARCH resnet18")
    monkeypatch.setitem(sys.modules, "onnx2torch", None)           # not installed
    assert error_of(con, f"LOAD MODEL m FROM '{onnx_file}'") == (
        "line 1, column 1: LOAD MODEL of an ONNX file needs the package onnx2torch (pip install onnx2torch)")


def keras_like(path, scale: bool = False, size=SIZE) -> tuple:
    """An ONNX file as Keras/TensorFlow exports it: input ``[N, H, W, 3]``, a Transpose to
    NCHW (perm 0,3,1,2), Conv, Relu, GlobalAveragePool, Flatten, Gemm; ``scale``: a Mul by
    a constant (a Rescaling layer) before the Transpose. And the same net in PyTorch, NCHW."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(6, 5)).eval()
    conv, fc = net[0], net[4]
    weights = {"w": conv.weight, "b": conv.bias, "fw": fc.weight, "fb": fc.bias, "k": torch.tensor(2.0)}
    image = "x"
    nodes = []
    if scale:
        nodes.append(helper.make_node("Mul", ["x", "k"], ["xs"]))
        net = nn.Sequential(Scaled(2.0), net)
        image = "xs"
    nodes += [helper.make_node("Transpose", [image], ["t"], perm=[0, 3, 1, 2]),
              helper.make_node("Conv", ["t", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "keras", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *size, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(t.detach().numpy(), name) for name, t in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path), net


class Scaled(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@pytest.mark.parametrize("scale", [False, True], ids=["transpose-first", "rescaled-first"])
def test_a_channels_last_onnx_model_is_fed_nchw_images(tmp_path, scale):
    """A Keras/TensorFlow ONNX file takes ``[N, H, W, C]``: it failed as 'patch 32x32 is
    larger than the image (240x3 after the model's resize)'. Its layout is told from the
    graph; a leading Transpose is removed (incremental inference still applies), else the
    image is permuted in front of the graph."""
    path, net = keras_like(tmp_path / "keras.onnx", scale)
    con = connection()
    assert con.execute(f"LOAD MODEL k FROM '{path}'").message == "model 'k' loaded (onnx, 5 classes)"
    spec = con.catalog.resolve_model("k")
    assert (spec.input_size, spec.channels, spec.module.input_layout) == (SIZE, 3, "NHWC")
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(spec.module(x), net(x), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(onnxruntime_logits(path, x.permute(0, 2, 3, 1).contiguous()),
                                   net(x).numpy(), atol=1e-5)
    query = "OCCLUDE img USING k PATCH 6 STRIDE 3 COLOR (0, 0, 0)"
    assert ", input=NHWC, " in con.execute(f"EXPLAIN {query}").plan.splitlines()[1]
    ref, _ = plain_heatmap(net, smooth_noise_image(*SIZE), (6, 6), (3, 3), BLACK)
    np.testing.assert_allclose(con.execute(query).heatmap, ref, atol=1e-5)
    if not scale:
        incremental_equals_naive(con, query)


# -- TorchScript -------------------------------------------------------------------------------

def test_torchscript_runs_naive_and_equals_the_plain_loop(model, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model.eval(), torch.rand(1, 3, *SIZE)).save(str(tmp_path / "net.pt"))
    con = connection()
    message = con.execute(f"LOAD MODEL ts FROM '{tmp_path / 'net.pt'}' TRUSTED").message
    assert message == "model 'ts' loaded (torchscript, 5 classes)"
    spec = con.catalog.resolve_model("ts")
    assert (spec.mean, spec.input_size, spec.channels) == (None, None, 3)
    query = "OCCLUDE img USING ts PATCH 8 STRIDE 8 COLOR (0, 0, 0)"
    plan = con.execute(f"EXPLAIN {query}").plan.splitlines()[1]
    assert "NaiveOcclusion" in plan and 'reason="TorchScript module: torch.fx cannot trace it"' in plan
    con.execute("SET strategy = 'incremental'")        # still the plain loop, still the reason
    result = con.execute(query)
    ref, target = plain_heatmap(model, smooth_noise_image(*SIZE), (8, 8), (8, 8), BLACK)
    assert moving(ref) and result.target == target
    np.testing.assert_allclose(result.heatmap, ref, atol=1e-5)


def test_a_damaged_torchscript_archive(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # torch.jit.script is deprecated, still written
        scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1),
                                                  nn.Flatten()))
    scripted.save(str(tmp_path / "good.pt"))
    with zipfile.ZipFile(tmp_path / "good.pt") as src, zipfile.ZipFile(tmp_path / "bad.pt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, b"def forward(self x):" if "/code/" in item.filename
                         and item.filename.endswith(".py") else data)
    assert f"cannot read model file '{tmp_path / 'bad.pt'}' as TorchScript: " in error_of(
        connection(), f"LOAD MODEL m FROM '{tmp_path / 'bad.pt'}' TRUSTED")


class Spy(nn.Module):
    """TorchScript whose forward writes a byte into ``marker`` (torch.from_file, shared):
    code in a model file, which KQL runs to learn the class count (no layer tells it)."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        seen = torch.from_file(self.marker, shared=True, size=1, dtype=torch.uint8)
        seen.fill_(1)
        return x.mean(dim=(2, 3)) @ self.weight + seen.float().sum() * 0


def spy_file(tmp_path) -> tuple:
    marker = tmp_path / "marker.bin"
    marker.write_bytes(b"\x00")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Spy(str(marker))).save(str(tmp_path / "spy.pt"))
    return tmp_path / "spy.pt", marker


def test_torchscript_runs_only_when_trusted(tmp_path):
    path, marker = spy_file(tmp_path)
    con = connection()
    for how in (lambda: con.execute(f"LOAD MODEL spy FROM '{path}'"),
                lambda: con.load_model("spy", str(path)),
                lambda: con.execute(f"LOAD MODEL spy FROM '{path}' ARCH torchscript LABELS 'x.txt'")):
        with pytest.raises(kql.KqlModelError) as info:
            how()
        message = str(info.value)
        assert "is TorchScript, code that runs when loaded, and needs TRUSTED (nothing of it ran)" in message
        assert message.endswith(f"LOAD MODEL spy FROM '{path}' TRUSTED") and "\n" not in message
        assert marker.read_bytes() == b"\x00"            # its code never ran
    assert "spy" not in [row["name"] for row in con.models()]
    (tmp_path / "mobile.ptl").write_bytes(b"\x18\x00\x00\x00PTMF" + bytes(64))
    with pytest.raises(kql.KqlModelError, match="TRUSTED"):           # a mobile flatbuffer too
        con.execute(f"LOAD MODEL m FROM '{tmp_path / 'mobile.ptl'}'")
    assert con.load_model("spy", str(path), trusted=True).num_classes == 2
    assert marker.read_bytes() == b"\x01"            # TRUSTED: it ran (the class-count probe)
    with pytest.raises(kql.KqlPlanError, match="trusted must be True or False"):
        con.load_model("spy", str(path), trusted="yes")


def test_a_catalog_trusts_the_bytes_it_was_told_to_trust(tmp_path, model):
    path, marker = spy_file(tmp_path)
    folder = str(tmp_path / "catalog")
    connection(folder).execute(f"LOAD MODEL spy FROM '{path}' TRUSTED")
    marker.write_bytes(b"\x00")
    assert connection(folder).catalog.resolve_model("spy").num_classes == 2     # the same file
    assert marker.read_bytes() == b"\x01"
    marker.write_bytes(b"\x00")
    other = Spy(str(marker))
    other.weight.data += 1
    with warnings.catch_warnings():                 # another archive at the same path
        warnings.simplefilter("ignore")
        torch.jit.script(other).save(str(path) + ".new")
    os.replace(str(path) + ".new", path)
    con = connection(folder)
    message = error_of(con, "OCCLUDE img USING spy")
    assert "changed since it was loaded TRUSTED" in message and message.endswith(" TRUSTED")
    assert marker.read_bytes() == b"\x00"
    catalog = tmp_path / "catalog" / "catalog.json"          # an entry of before TRUSTED
    text = catalog.read_text()
    catalog.write_text(re.sub(r',\s*"trusted":\s*"[0-9a-f]+"', "", text))
    assert '"trusted"' not in catalog.read_text()
    assert "needs TRUSTED (nothing of it ran): LOAD MODEL spy" in error_of(
        connection(folder), "OCCLUDE img USING spy")
    assert marker.read_bytes() == b"\x00"


# -- persistence -----------------------------------------------------------------------------

def test_loaded_files_are_found_again_by_a_later_session(onnx_file, tmp_path, model):
    scripted = tmp_path / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model.eval(), torch.rand(1, 3, *SIZE)).save(str(scripted))
    first = connection(str(tmp_path / "catalog"))
    first.execute(f"LOAD MODEL net FROM '{onnx_file}'; LOAD MODEL ts FROM '{scripted}' TRUSTED")
    first_map = first.execute("OCCLUDE img USING net PATCH 8 STRIDE 8").heatmap
    later = connection(str(tmp_path / "catalog"))
    rows = {row["name"]: row["arch"] for row in later.models()}
    assert rows["net"] == "onnx" and rows["ts"] == "torchscript"
    np.testing.assert_allclose(later.execute("OCCLUDE img USING net PATCH 8 STRIDE 8").heatmap,
                               first_map, atol=1e-6)
    np.testing.assert_allclose(later.execute("OCCLUDE img USING ts PATCH 8 STRIDE 8").heatmap,
                               first_map, atol=1e-5)
    assert later.catalog.resolve_model("net").input_size == SIZE
