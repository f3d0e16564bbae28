"""State dicts as users have them (safetensors and torch.save files, for torchvision, timm or
the user's own factory) and in-memory modules with their own channels; whole pickled modules
and malicious pickles never run. Each file is made here (nothing downloaded)."""

import pickle
import shutil
import sys
import zipfile

import pytest
import torch
from torch import nn

import kql
from helpers import Boom, incremental_equals_naive, smooth_noise_image
from helpers import image_connection as connection
from helpers import model_error as error_of


# -- safetensors, timm, the user's factory ----------------------------------------------------------

def test_missing_optional_packages_are_named(tmp_path, monkeypatch):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    (tmp_path / "w.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    con = connection()
    assert error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'w.pt'}' ARCH timm:resnet18").endswith(
        "ARCH timm:resnet18 needs the package timm (pip install timm)")
    assert error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'w.safetensors'}' ARCH resnet18").endswith(
        "LOAD MODEL of a safetensors file needs the package safetensors (pip install safetensors)")


def test_safetensors_state_dict(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    saved = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    save_file(saved.state_dict(), str(tmp_path / "weights.safetensors"))
    con = connection()
    path = tmp_path / "weights.safetensors"
    message = con.execute(f"LOAD MODEL m FROM '{path}' ARCH mobilenet_v3_small").message
    assert message == "model 'm' loaded (mobilenet_v3_small, 10 classes)"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(con.catalog.resolve_model("m").module(x), saved(x))
    shutil.copy(path, tmp_path / "mobilenet.pt")        # no ARCH: the model's name is the builder
    con.execute(f"LOAD MODEL mobilenet_v3_small FROM '{tmp_path / 'mobilenet.pt'}'")
    assert con.catalog.resolve_model("mobilenet_v3_small").arch == "mobilenet_v3_small"
    damaged = tmp_path / "bad.safetensors"               # a header cut short
    damaged.write_bytes((40).to_bytes(8, "little") + b'{"w": {"dtype": "F32", ' + b" " * 40)
    assert f"cannot read model file '{damaged}' as safetensors: " in error_of(
        con, f"LOAD MODEL m FROM '{damaged}' ARCH resnet18")


def test_timm_state_dict_runs_incrementally(tmp_path):
    import timm

    torch.manual_seed(0)
    saved = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    with torch.no_grad():
        saved.fc.weight.mul_(20.0)                      # a map that moves
    torch.save(saved.state_dict(), tmp_path / "t.pt")
    con = connection(image=smooth_noise_image(64, 64))
    message = con.execute(f"LOAD MODEL t FROM '{tmp_path / 't.pt'}' ARCH timm:test_resnet").message
    assert message == "model 't' loaded (timm:test_resnet, 7 classes)"
    spec = con.catalog.resolve_model("t")
    assert (spec.mean, spec.input_size) == ((0.5, 0.5, 0.5), (160, 160))     # timm's config
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(spec.module(x), saved(x))
    incremental_equals_naive(con, "OCCLUDE img USING t PATCH 40 STRIDE 40 COLOR (0, 0, 0)")
    assert error_of(con, f"LOAD MODEL t FROM '{tmp_path / 't.pt'}' ARCH timm:test_resnt").endswith(
        "unknown timm model 'test_resnt'; did you mean 'timm:test_resnet'?")


FACTORIES = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))

def boom():
    raise RuntimeError("no GPU here")

def not_a_module():
    return 42

count = 3
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "kql_test_factories.py").write_text(FACTORIES)
    (tmp_path / "kql_test_broken.py").write_text("import kql_test_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "kql_test_factories"
    for name in ("kql_test_factories", "kql_test_broken"):
        sys.modules.pop(name, None)


def test_the_users_factory(tmp_path, factory_module):
    import kql_test_factories

    saved = kql_test_factories.make()
    with torch.no_grad():
        saved[-1].weight.mul_(3.0)
    torch.save(saved.state_dict(), tmp_path / "mine.pt")
    con = connection()
    path = tmp_path / "mine.pt"
    assert con.execute(f"LOAD MODEL mine FROM '{path}' ARCH 'kql_test_factories:make'").message == (
        "model 'mine' loaded (kql_test_factories:make, 3 classes)")
    spec = con.catalog.resolve_model("mine")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(spec.module(x), saved(x))
    assert (spec.mean, spec.input_size) == (None, None)
    assert con.execute("OCCLUDE img USING mine PATCH 8 STRIDE 8").heatmap.shape == (3, 3)
    for arch, expected in [
            ("kql_test_missing:make", "ARCH 'kql_test_missing:make': no module named 'kql_test_missing' "
                                      "(is its folder on PYTHONPATH?)"),
            ("kql_test_broken:make", "ARCH 'kql_test_broken:make': importing 'kql_test_broken' failed: "
                                     "ModuleNotFoundError: No module named 'kql_test_not_installed'"),
            ("kql_test_factories:nothing", "ARCH 'kql_test_factories:nothing': module "
                                           "'kql_test_factories' has no attribute 'nothing'"),
            ("kql_test_factories:count", "ARCH 'kql_test_factories:count': 'count' is an int, not a "
                                         "factory function or class"),
            ("kql_test_factories:boom", "ARCH 'kql_test_factories:boom': the factory failed: "
                                        "RuntimeError: no GPU here"),
            ("kql_test_factories:not_a_module", "ARCH 'kql_test_factories:not_a_module': the factory "
                                                "returned an int, not a torch.nn.Module")]:
        assert error_of(con, f"LOAD MODEL m FROM '{path}' ARCH '{arch}'") == f"line 1, column 1: {expected}"


# -- files that must never run code -----------------------------------------------------------------

def test_a_whole_pickled_module_is_refused_with_how_to_save_it(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "whole.onnx")           # the name says nothing
    message = error_of(connection(), f"LOAD MODEL m FROM '{tmp_path / 'whole.onnx'}' ARCH resnet18")
    assert "(torch.nn.modules.linear.Linear), which are never run" in message
    assert message.endswith("save a state dict instead: torch.save(model.state_dict(), path)")


def test_malicious_files_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    evil = pickle.dumps({"w": Boom(marker)}, protocol=2)
    (tmp_path / "evil.onnx").write_bytes(evil)                      # a pickle named .onnx
    torch.save({"w": Boom(marker)}, tmp_path / "evil.pt")
    with zipfile.ZipFile(tmp_path / "evil.pt") as src, zipfile.ZipFile(tmp_path / "script.pt", "w") as dst:
        for item in src.infolist():                                 # dressed as TorchScript
            dst.writestr(item, src.read(item))
        prefix = src.namelist()[0].split("/")[0]
        dst.writestr(f"{prefix}/constants.pkl", evil)
        dst.writestr(f"{prefix}/code/__torch__.py", b"")
    con = connection()
    for name in ("evil.onnx", "evil.pt", "script.pt"):
        message = error_of(con, f"LOAD MODEL m FROM '{tmp_path / name}' ARCH resnet18"
                           if name != "script.pt" else f"LOAD MODEL m FROM '{tmp_path / name}'")
        assert ("TRUSTED" if name == "script.pt" else "cannot read model file") in message
        assert not marker.exists()
    # Even TRUSTED, TorchScript's own unpickler runs no Python objects' code.
    assert "cannot read model file" in error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'script.pt'}' TRUSTED")
    assert not marker.exists()


# -- channels --------------------------------------------------------------------------------

def test_a_one_channel_model_with_its_own_normalisation():
    torch.manual_seed(0)
    grey = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    con = connection()
    con.register_model("grey", grey, mean=(0.5,), std=(0.25,))
    spec = con.catalog.resolve_model("grey")
    assert (spec.mean, spec.std, spec.channels) == ((0.5,), (0.25,), 1)
    assert con.execute("OCCLUDE img USING grey PATCH 8 STRIDE 8").heatmap.shape == (3, 3)
    with pytest.raises(kql.KqlPlanError, match="mean has 3 values but the model's first convolution "
                                               "takes 1 channel$"):
        con.register_model("grey", grey, mean=(0.5, 0.5, 0.5))
    with pytest.raises(kql.KqlPlanError, match="mean has 1 values but std has 2"):
        con.register_model("flat", nn.Linear(2, 2), mean=(0.5,), std=(1.0, 1.0))
