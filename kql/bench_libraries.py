"""Captum and MONAI in ``kql bench``, and KQL's drop-ins for them on the same windows.

Each library is given the band (the bench's grid rows, as pixel rows ``y0 .. y1``) as its
input and a forward that pastes it back into the image (:class:`Band`), so it slides its
windows over exactly the band:

* Captum's ``Occlusion``: windows ``(3, patch, patch)``, strides ``(3, stride, stride)``,
  the patch colour as its baseline, the forward's softmax at the image's predicted class;
* MONAI's ``OcclusionSensitivity``: ``mask_size = patch``, ``n_batch = --batch`` (16 by
  default), the colour as its float ``mode``, and the overlap that makes MONAI's step
  ``int(patch * (1 - overlap))`` the stride (:func:`monai_overlap`); MONAI softmaxes the
  outputs (its ``activate``) and averages each pixel over the windows covering it.

Where the stride does not divide ``width - patch`` both libraries slide one more column
than KQL's grid (Captum cuts it at the border, MONAI pulls it back inside). ``kql captum``
and ``kql monai`` are :mod:`kql.integrations`' drop-ins, called with the same arguments
and planned afresh each round (as a first call); the report compares their outputs with
the libraries' (:func:`library_differences`).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .errors import KqlError

CAPTUM, MONAI = "captum", "monai"
DROP_INS = {CAPTUM: "kql captum", MONAI: "kql monai"}


class Band(nn.Module):
    """``model`` on ``image`` ``[1, C, H, W]`` with rows ``y0 .. y1`` replaced by its input
    (``[B, C, y1 - y0, W]``), softmaxed when asked. Padding and adding the rest of the
    image keep it traceable by torch.fx, so KQL's drop-ins run it on KQL's engine."""

    def __init__(self, model: nn.Module, image: torch.Tensor, y0: int, y1: int, softmax: bool):
        super().__init__()
        self.model, self.softmax = model, softmax
        rest = image.clone()
        rest[:, :, y0:y1] = 0
        self.register_buffer("rest", rest)
        self.pad = (0, 0, y0, image.shape[2] - y1)

    def forward(self, band):
        out = self.model(F.pad(band, self.pad) + self.rest)
        return torch.softmax(out, dim=1) if self.softmax else out


def monai_overlap(patch: int, stride: int) -> float:
    """MONAI's ``overlap`` whose step ``int(patch * (1 - overlap))`` is ``stride``: half a
    pixel over it, so float rounding cannot drop the step below (0 for ``stride ==
    patch``; a stride over the patch has none: MONAI's windows never leave gaps).

    >>> [int(16 * (1 - monai_overlap(16, s))) for s in (1, 4, 15, 16)]
    [1, 4, 15, 16]
    """
    if stride > patch:
        raise KqlError(f"--monai needs --stride <= --patch (MONAI's windows leave no gaps), "
                       f"got stride {stride} and patch {patch}")
    return 0.0 if stride == patch else 1.0 - (stride + 0.5) / patch


def captum_runner(model, image, patch, stride, color, target, batch, y0, y1, planning=None):
    """Captum's ``Occlusion`` on rows ``y0 .. y1`` of ``image`` ``[1, C, H, W]``; the run
    returns the attribution ``[1, C, y1 - y0, W]``. With ``planning`` (a list), KQL's
    drop-in instead, and each run's planning seconds go to it."""
    drop_in = planning is not None
    if drop_in:
        from .integrations.captum import Occlusion
    else:
        from captum.attr import Occlusion

    occ = Occlusion(Band(model, image, y0, y1, softmax=True).eval())
    strip = image[:, :, y0:y1]
    baseline = torch.full_like(strip, float(color[0]))   # a tensor on the input's device

    def run():
        with _call(occ, planning), torch.inference_mode():
            return occ.attribute(strip, sliding_window_shapes=(3, *patch), strides=(3, *stride),
                                 baselines=baseline, target=target, perturbations_per_eval=batch)
    return run


def monai_runner(model, image, patch: int, stride: int, color, batch, y0, y1, planning=None):
    """MONAI's ``OcclusionSensitivity`` on rows ``y0 .. y1`` of ``image``; the run returns
    the occlusion map ``[1, classes, y1 - y0, W]``. ``planning``: as for
    :func:`captum_runner`."""
    drop_in = planning is not None
    if drop_in:
        from .integrations.monai import OcclusionSensitivity
    else:
        from monai.visualize import OcclusionSensitivity

    occ = OcclusionSensitivity(Band(model, image, y0, y1, softmax=False).eval(), mask_size=patch,
                               n_batch=batch, verbose=False, mode=float(color[0]),
                               overlap=monai_overlap(patch, stride))
    strip = image[:, :, y0:y1]

    def run():
        with _call(occ, planning), torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="monai")  # its indexing
            return occ(strip)[0]
    return run


@contextlib.contextmanager
def _call(occ, planning):
    """One call of a library, or of a drop-in planned as a first call (nothing kept from an
    earlier round) whose planning seconds go to ``planning``."""
    if planning is None:
        yield
        return
    cache = occ.connection.plan_cache
    cache.clear()
    cache.lasting, cache.learning = None, False
    yield
    planning.append(sum(plan.planning_seconds for plan in occ.plans))


def library_engines(args, model, image, color, target, rows, planning: dict) -> dict:
    """The engines ``--captum`` and ``--monai`` (and plain Captum unless ``--no-captum``)
    add, by name: ``model`` the composed model on ``args.device``, ``image`` ``[1, C, H, W]``
    there, ``target`` the class Captum explains, ``rows`` the band's pixel rows; the
    drop-ins' planning seconds go to ``planning[name]``."""
    patch, stride = (args.patch,) * 2, (args.stride,) * 2
    engines = {}
    if not args.no_captum:
        engines[CAPTUM] = captum_runner(model, image, patch, stride, color, target, args.batch, *rows)
    if args.captum:
        name = DROP_INS[CAPTUM]
        engines[name] = captum_runner(model, image, patch, stride, color, target, args.batch,
                                      *rows, planning=planning.setdefault(name, []))
    if args.monai:
        engines[MONAI] = monai_runner(model, image, args.patch, args.stride, color, args.batch, *rows)
        name = DROP_INS[MONAI]
        engines[name] = monai_runner(model, image, args.patch, args.stride, color, args.batch,
                                     *rows, planning=planning.setdefault(name, []))
    return engines


def library_differences(results: dict) -> dict:
    """``{library: max |KQL's drop-in - library|}`` where both engines ran (NaN, a pixel no
    window covers, matches only NaN).

    >>> library_differences({"captum": [1.0, float("nan")], "kql captum": [1.5, float("nan")]})
    {'captum': 0.5}
    """
    out = {}
    for library, drop_in in DROP_INS.items():
        if library in results and drop_in in results:
            theirs, ours = (torch.as_tensor(results[k]).double().cpu() for k in (library, drop_in))
            diff = (theirs - ours).abs()
            diff[theirs.isnan() & ours.isnan()] = 0.0
            out[library] = float(diff.nan_to_num(float("inf")).max())
    return out
