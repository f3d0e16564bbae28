"""Model files as users have them on disk: each loads or is refused in one line
(KqlModelError), never a raw exception, a memory blow-up or code run from a pickle. Every
hostile file is made here, in ``tmp_path``; the image and file-system cases are in
``test_hostile_files``.
"""

import os
import pickle

import pytest
import torch
import torchvision

import kql
from kql import models
from helpers import Boom, state_dict_of
from helpers import one_line_error as error_of
from models_zoo import small_cnn


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
