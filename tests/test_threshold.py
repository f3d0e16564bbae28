"""Projective-field thresholding (seed paper 000, section 4.2) and frozen global gates
against a slow reference.

The reference here runs every node on full tensors with torch.fx's own interpreter and,
where the step table computes a node on a changed region, keeps the full result only
inside that region (the unoccluded view elsewhere): plain tensors and masks, no gathers,
windows or pastes. The incremental engine must match it to float rounding at every
tau, on small models of every operator kind; at tau = 1 it must be the exact engine
bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx

import kql
from helpers import blob_image, calibrate_batchnorm, sensitive
from kql.operators.incremental import IncrementalOcclusion
from kql.operators.profile import ModelProfile
from kql.operators.steps import FROZEN, Crossover, plan_steps, threshold
from kql.operators.task import OcclusionTask
from models_zoo import CUSTOM, custom_model

PATCH = (12, 12)
COLOR = (0.0, 0.0, 0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


class MaskedReference(fx.Interpreter):
    """Full tensors; a node the steps run on a region keeps its result only there."""

    def __init__(self, profile, table, item: int):
        super().__init__(profile.gm)
        self.profile, self.table, self.item = profile, table, item

    def run_node(self, n):
        step = self.table[n]
        if step.mode == FROZEN:                      # a frozen gate: its unoccluded value
            return self.profile.views[n]
        out = super().run_node(n)
        if step.incremental:
            view = self.profile.views[n]
            y, x = int(step.y[self.item]), int(step.x[self.item])
            (h, w), keep = step.size, torch.zeros_like(view, dtype=torch.bool)
            keep[..., y:y + h, x:x + w] = True
            out = torch.where(keep, out, view)
        return out


def reference_logits(profile, table, image, ys, xs) -> torch.Tensor:
    rows = []
    for i, (y, x) in enumerate(zip(ys, xs)):
        occluded = image.clone()
        occluded[:, y:y + PATCH[0], x:x + PATCH[1]] = torch.tensor(COLOR).view(3, 1, 1)
        with torch.inference_mode():
            rows.append(MaskedReference(profile, table, i).run(occluded[None])[0])
    return torch.stack(rows)


def positions(h, w, stride=(9, 11)):
    ys, xs = np.meshgrid(np.arange(0, h - PATCH[0] + 1, stride[0]),
                         np.arange(0, w - PATCH[1] + 1, stride[1]), indexing="ij")
    return ys.ravel(), xs.ravel()


def engine_logits(profile, table, model, image, ys, xs):
    task = OcclusionTask(model, image, torch.tensor(COLOR), PATCH, ys, xs)
    return IncrementalOcclusion(profile, table, batch_size=5).run(task).logits


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("tau", [0.3, 0.6])
@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_thresholded_engine_matches_the_masked_reference(name, tau):
    h, w = (40, 96) if name == "non_square_kernels" else (64, 80)
    image = blob_image(h, w, seed=1)
    model = sensitive(calibrate_batchnorm(custom_model(name), h, w), image, PATCH)
    profile = ModelProfile(model, image)
    ys, xs = positions(h, w)
    table = plan_steps(profile, ys, xs, PATCH, Crossover(), tau)
    target = int(profile.base_logits.argmax())
    got = engine_logits(profile, table, model, image, ys, xs)
    want = reference_logits(profile, table, image, ys, xs)[:, target].numpy()
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 1e-4 * scale, (name, tau)


def test_threshold_changes_the_map_and_caps_every_region():
    """A cap that bites must change the logits (else the test above proves nothing)."""
    h, w = 48, 56
    image = blob_image(h, w, seed=1)
    model = sensitive(calibrate_batchnorm(custom_model("residual_two_rf"), h, w), image, PATCH)
    profile = ModelProfile(model, image)
    ys, xs = positions(h, w)
    exact = plan_steps(profile, ys, xs, PATCH)
    capped = plan_steps(profile, ys, xs, PATCH, Crossover(), 0.3)
    for step in capped:
        if step.incremental and step.node.op != "placeholder":
            mh, mw = profile.map_size(step.node)
            assert step.size[0] <= max(1, round(0.3 * mh)) and step.size[1] <= max(1, round(0.3 * mw))
    assert sum(s.size[0] * s.size[1] for s in capped if s.incremental) < \
        sum(s.size[0] * s.size[1] for s in exact if s.incremental)
    a = engine_logits(profile, exact, model, image, ys, xs)
    b = engine_logits(profile, capped, model, image, ys, xs)
    assert np.abs(a - b).max() > 1e-3


def test_threshold_keeps_the_centre_of_the_region():
    (y, x), size = threshold((np.array([0, 10, 30]), np.array([5, 5, 5])), (10, 4), (40, 40), 0.1)
    assert size == (4, 4)
    assert y.tolist() == [3, 13, 33] and x.tolist() == [5, 5, 5]    # width 4 already fits
    (y, _), size = threshold((np.array([34]), np.array([0])), (6, 6), (40, 40), 0.1)
    assert size == (4, 4) and y.tolist() == [35]                   # centred, inside the map


def test_tau_one_is_the_exact_engine_bit_for_bit():
    h, w = 48, 56
    image = blob_image(h, w, seed=2)
    model = sensitive(calibrate_batchnorm(custom_model("cat_inception"), h, w), image, PATCH)
    con = kql.connect()
    con.register_model("net", model)
    con.register_image("img", image)
    con.execute("SET strategy = 'incremental'")
    query = "OCCLUDE img USING net PATCH 12 STRIDE 6 COLOR black BATCH 4"
    exact = con.execute(query)
    con.execute("SET tau = 1")
    same = con.execute(query)
    np.testing.assert_allclose(exact.logits, same.logits, atol=1e-5, rtol=0)
    con.execute("SET tau = 0.2")
    approx = con.execute(query)
    assert "tau=0.20" in approx.plan.splitlines()[1]
    assert not np.array_equal(exact.logits, approx.logits)


@pytest.mark.parametrize("name", ["squeeze_excite", "residual_two_rf", "mul_branches"])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_frozen_gates_match_the_masked_reference(name, tau):
    h, w = 64, 80
    image = blob_image(h, w, seed=1)
    model = sensitive(calibrate_batchnorm(custom_model(name), h, w), image, PATCH)
    profile = ModelProfile(model, image)
    ys, xs = positions(h, w)
    table = plan_steps(profile, ys, xs, PATCH, Crossover(), tau, gates="frozen")
    target = int(profile.base_logits.argmax())
    got = engine_logits(profile, table, model, image, ys, xs)
    want = reference_logits(profile, table, image, ys, xs)[:, target].numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max())), (name, tau)
    if name == "squeeze_excite":
        assert table.count(FROZEN) >= 1                      # the gate is frozen ...
        exact = plan_steps(profile, ys, xs, PATCH, Crossover(), tau)
        assert table.count("patch") > exact.count("patch")    # ... and patches run past it
    else:
        assert not profile.gates                               # a classifier head is no gate


def test_frozen_gates_are_a_setting_and_show_in_explain():
    h, w = 64, 80
    image = blob_image(h, w, seed=1)
    con = kql.connect()
    con.register_model("net", sensitive(calibrate_batchnorm(custom_model("squeeze_excite"), h, w),
                                        image, PATCH))
    con.register_image("img", image)
    con.execute("SET strategy = 'incremental'")
    query = "OCCLUDE img USING net PATCH 12 STRIDE 8 COLOR black"
    exact = con.execute(query)
    con.execute("SET gates = 'frozen'")
    frozen = con.execute("EXPLAIN ANALYZE " + query)
    assert "frozen_gates=1" in frozen.plan.splitlines()[1] and "achieved_ssim=" in frozen.plan
    assert not np.array_equal(con.execute(query).logits, exact.logits)
    with pytest.raises(kql.KqlError, match="gates must be 'exact' or 'frozen'"):
        con.execute("SET gates = 'maybe'")
