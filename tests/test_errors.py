"""Every bad input gets one clear line (with line and column for query text)."""

import os
import pickle

import pytest
import torch
import torchvision

import kql
from helpers import smooth_noise_image


@pytest.fixture
def con(small_model):
    c = kql.connect()
    c.register_model("net", small_model, labels=["a", "b", "c", "d", "e"])
    c.register_image("img", smooth_noise_image(24, 30))
    return c


def error_of(con, query):
    with pytest.raises(kql.KqlError) as info:
        con.execute(query)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return info.value


@pytest.mark.parametrize("query,cls,expected", [
    ("OCCLUDE img USING nope", kql.KqlModelError, "line 1, column 19: unknown model 'nope'"),
    ("OCCLUDE what USING net", kql.KqlImageError, "line 1, column 9: unknown image 'what'"),
    ("OCCLUDE sample('chelse') USING net", kql.KqlImageError,
     "unknown sample image 'chelse'; did you mean 'chelsea'?"),
    ("OCCLUDE img USING net TARGET 'zebra'", kql.KqlPlanError, "unknown label 'zebra'"),
    ("OCCLUDE img USING net TARGET 7", kql.KqlPlanError,
     "line 1, column 23: target class 7 is out of range: model 'net' has 5 classes (0..4)"),
    ("OCCLUDE img USING net PATCH 25 x 4", kql.KqlPlanError,
     "patch 25x4 is larger than the image (24x30 after the model's resize)"),
    ("OCCLUDE img USING net PATCH 0", kql.KqlPlanError, "patch size must be at least 1"),
    ("OCCLUDE img USING net STRIDE 0 x 2", kql.KqlPlanError, "line 1, column 23: stride must be at least 1"),
    ("OCCLUDE img USING net PATCH 8 REGION (0, 0, 6, 20)", kql.KqlPlanError,
     "patch 8x8 is larger than the region (20x6)"),
    ("OCCLUDE img USING net REGION (20, 0, 20, 10)", kql.KqlPlanError, "is not inside the image"),
    ("OCCLUDE img USING net WITH SSIM >= 1.5", kql.KqlPlanError, "SSIM target must lie in (0, 1], got 1.5"),
    ("OCCLUDE img USING net WITH SSIM >= 0", kql.KqlPlanError, "SSIM target must lie in (0, 1], got 0"),
    ("OCCLUDE img USING net DRILLDOWN 0.25 SPEEDUP 5", kql.KqlPlanError, "SPEEDUP must lie in (1, 4)"),
    ("OCCLUDE img USING net COLOR (2, 0, 0)", kql.KqlPlanError, "colour components must lie in [0, 1]"),
    ("OCCLUDE img USING net BATCH 0", kql.KqlPlanError, "BATCH must be at least 1"),
    ("OCCLUDE img USING net INTO 'x.jpg'", kql.KqlPlanError, "unsupported file type '.jpg'"),
    ("OCCLUDE img USING net INTO '/no/such/dir/x.png'", kql.KqlPlanError, "does not exist"),
    ("SET strategy = 'fast'", kql.KqlPlanError, "strategy must be"),
    ("SET colour = 1", kql.KqlPlanError, "unknown setting 'colour'"),
    ("OCCLUDE img USING net PATCH", kql.KqlSyntaxError, "line 1, column"),
    ("SHOW MODELS;\nOCCLUDE img USIN net", kql.KqlSyntaxError, "line 2, column 13"),
    ("OCCLUDE img USING vgg16", kql.KqlModelError, "has no weights here"),
])
def test_query_errors(con, query, cls, expected):
    err = error_of(con, query)
    assert isinstance(err, cls)
    assert expected in str(err)


def test_gpu_without_cuda(con):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # CI machines have none
    err = error_of(con, "OCCLUDE img USING net ON GPU")
    assert "line 1, column 23: ON GPU: no CUDA GPU is available" in str(err)


def test_caret_points_at_the_clause(con):
    err = error_of(con, "OCCLUDE img USING net\n  PATCH 0")
    assert (err.line, err.column) == (2, 3)
    assert err.context() == "    PATCH 0\n    ^"


def test_bad_image_files(con, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path, expected in [(tmp_path / "missing.png", "does not exist"),
                           (corrupt, "cannot read image file"), (text, "cannot read image file"),
                           (tmp_path, "is a directory")]:
        err = error_of(con, f"LOAD IMAGE x FROM '{path}'")
        assert isinstance(err, kql.KqlImageError) and expected in str(err)
    err = error_of(con, f"OCCLUDE '{corrupt}' USING net")
    assert str(err).startswith("line 1, column 9: cannot read image file")


def test_bad_model_files(con, tmp_path):
    missing = error_of(con, f"LOAD MODEL m FROM '{tmp_path / 'none.pt'}' ARCH resnet18")
    assert "does not exist" in str(missing)
    wrong = tmp_path / "wrong.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), wrong)
    err = error_of(con, f"LOAD MODEL m FROM '{wrong}' ARCH resnet18")
    assert isinstance(err, kql.KqlModelError) and "does not fit resnet18" in str(err)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    assert "cannot read model file" in str(error_of(con, f"LOAD MODEL m FROM '{garbage}' ARCH resnet18"))
    unknown = error_of(con, f"LOAD MODEL m FROM '{wrong}' ARCH resnet19")
    assert "unknown architecture 'resnet19'; did you mean 'resnet18'?" in str(unknown)
    labels = tmp_path / "labels.txt"
    labels.write_text("one\ntwo\n")
    sq = tmp_path / "sq.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=3).state_dict(), sq)
    err = error_of(con, f"LOAD MODEL m FROM '{sq}' ARCH squeezenet1_1 LABELS '{labels}'")
    assert "has 2 labels but the model has 3 classes" in str(err)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_never_runs(con, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"w": Boom()}, fh)
    err = error_of(con, f"LOAD MODEL m FROM '{evil}' ARCH resnet18")
    assert "cannot read model file" in str(err)
    assert not (tmp_path / "PWNED").exists()


def test_failing_model_writes_nothing(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            if x.shape[0] > 1:
                raise RuntimeError("kaput")
            return torch.zeros(1, 3)

    con = kql.connect()
    con.register_model("bad", Broken())
    con.register_image("img", smooth_noise_image(24, 30))
    out = tmp_path / "m.npy"
    err = error_of(con, f"OCCLUDE img USING bad PATCH 8 INTO '{out}'")
    assert isinstance(err, kql.KqlModelError) and "kaput" in str(err)
    assert os.listdir(tmp_path) == []


def test_model_with_wrong_output_shape():
    con = kql.connect()
    con.register_model("flat", torch.nn.Identity())
    con.register_image("img", smooth_noise_image(24, 30))
    err = error_of(con, "OCCLUDE img USING flat PATCH 8")
    assert "must return logits of shape [batch, classes]" in str(err)


@pytest.mark.parametrize("bad,expected", [
    (torch.rand(3, 4, 4) * 3, "must lie in [0, 1]"),
    (torch.zeros(2, 4, 4), "must have shape [3, H, W]"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), "must be float"),
    ("pic.png", "must be a torch tensor or a numpy array"),
])
def test_register_bad_images(bad, expected):
    with pytest.raises(kql.KqlImageError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        kql.connect().register_image("x", bad)


def test_register_bad_model():
    with pytest.raises(kql.KqlPlanError, match="expected a torch.nn.Module"):
        kql.connect().register_model("x", lambda t: t)


@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_target_out_of_range_without_labels(strategy):
    """Without labels the class count is known only once the model ran."""
    con = kql.connect()
    con.register_model("n", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                                torch.nn.Flatten()))
    con.register_image("i", smooth_noise_image(20, 20))
    con.execute(f"SET strategy = '{strategy}'")
    err = error_of(con, "OCCLUDE i USING n PATCH 4 TARGET 9")
    assert str(err) == "line 1, column 27: target class 9 is out of range: the model has 4 classes (0..3)"
