"""``kql bench``: naive, incremental, Captum and MONAI occlusion, side by side in one process.

"pure incremental" is the seed prototype's engine: patches run up to the global boundary
(``SET crossover = 'none'``), one region size for every position (``SET position_groups =
'off'``), every convolution over its window (``SET delta_convolutions = 'off'``); the FLOP ratio line compares its GFLOPs with the chosen plan's; "chosen plan" is what the optimizer picks (``auto``), and
``--crossovers`` adds every crossover the planner costs.

The engines compute the same patch positions (a band of whole grid rows around the
image centre) with the same batch size, one after the other, ``--repeat`` times (each
round in a rotated order); the median time of each is reported with the speedup against
naive, the peak memory each added to the process, and the theoretical redundancy ratio R
(seed paper 000, eqs 16-20).
Captum's ``Occlusion`` is given the band as its input and pastes it back into the image
inside the forward function, so it visits the same positions. ``--captum`` and ``--monai``
add KQL's drop-ins for Captum and MONAI (:mod:`kql.integrations`) and MONAI itself on the
band the same way, and print how far each drop-in's output is from its library's
(:mod:`.bench_libraries`). ``--volume`` runs the 3D benchmark instead
(:mod:`.bench_volumes`: a volume's whole map against a plain 3D loop and MONAI).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from .bench_engines import PLAIN, PURE, PeakMemory, build_engines, measure, plain_loop_runner
from .bench_libraries import captum_runner
from .bench_report import flop_ratio, plan_gflops, report
from .errors import KqlError

# what the benchmarks/ scripts and earlier callers use from here
__all__ = ["PLAIN", "PURE", "PeakMemory", "band", "build_model", "captum_runner", "flop_ratio",
           "main", "plain_loop_runner", "plan_gflops"]


def build_model(name: str, classes: int = 1000):
    """A torchvision architecture with random weights (speed does not depend on weights)."""
    from .catalog import models

    if name == models.BUILTIN:
        spec = models.builtin_efficientnet_lite0()
        return spec, spec.composed()
    import torchvision

    torch.manual_seed(0)
    kwargs = {"init_weights": False, "aux_logits": False} if name in ("inception_v3", "googlenet") else {}
    module = torchvision.models.get_model(name, weights=None, num_classes=classes, **kwargs).eval()
    spec = models.ModelSpec(name, module, models.IMAGENET_MEAN, models.IMAGENET_STD,
                            models.default_input_size(name), None, arch=name)
    return spec, spec.composed()


def band(grid_rows: int, grid_cols: int, positions: int) -> tuple[int, int]:
    """Grid rows [r0, r1) around the centre holding about ``positions`` positions."""
    rows = max(1, min(grid_rows, round(positions / grid_cols)))
    r0 = (grid_rows - rows) // 2
    return r0, r0 + rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--volume" in argv:                  # 3D: its own model, volume and options
        from . import bench_volumes

        return bench_volumes.main([a for a in argv if a != "--volume"])
    args = _parser().parse_args(argv)
    from .planner import calibrate

    try:
        # every engine, the planner and its calibration on one thread count, then restored
        with calibrate.threads(args.threads or torch.get_num_threads()):
            return _bench(args)
    except KqlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser():
    p = argparse.ArgumentParser(prog="kql bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16", help="torchvision builder or efficientnet_lite0")
    p.add_argument("--image", default="chelsea", help="skimage sample name")
    p.add_argument("--size", default=None, metavar="HxW",
                   help="the model's input size (default: its own, e.g. 224x224); small inputs: 96x112")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--positions", type=int, default=256, help="about this many positions")
    p.add_argument("--batch", type=int, default=16, help="batch size of every engine")
    p.add_argument("--plan-batch", default=None, metavar="N|auto",
                   help="the chosen plan's BATCH instead (auto: none given, KQL's own choice); "
                        "the other engines keep --batch")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the engines; medians reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of every engine (default: torch's own, as a user's loop)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-captum", action="store_true", help="skip Captum")
    p.add_argument("--captum", action="store_true",
                   help="also time KQL's drop-in Captum Occlusion (kql.integrations.captum) on "
                        "Captum's windows, and print how far its attribution is from Captum's")
    p.add_argument("--monai", action="store_true",
                   help="also time MONAI's OcclusionSensitivity (mask = patch, n_batch = --batch, "
                        "the overlap whose step is the stride) and KQL's drop-in for it, and print "
                        "how far their maps are apart")
    p.add_argument("--tau", type=float, default=None,
                   help="approximate: the chosen plan runs with SET tau = TAU")
    p.add_argument("--ssim", type=float, default=None,
                   help="approximate: the chosen plan runs WITH SSIM >= SSIM (tuned by CALIBRATE)")
    p.add_argument("--calibrate", default=None, metavar="IMAGES",
                   help="with --ssim: first tune on these skimage samples (comma-separated)")
    p.add_argument("--gates", default="exact", choices=("exact", "frozen"),
                   help="approximate: the chosen plan keeps global gates at their unoccluded values")
    p.add_argument("--drilldown", type=float, default=None, metavar="R",
                   help="approximate: the chosen plan runs DRILLDOWN R (stage two on R of the map)")
    p.add_argument("--speedup", type=float, default=None,
                   help="with --drilldown: its SPEEDUP (sets the stage-one stride, eq 47)")
    p.add_argument("--naive-positions", type=int, default=None, metavar="N",
                   help="time naive on a band of about N positions only (its time per position "
                        "is constant); maps are then compared with pure incremental (exact)")
    p.add_argument("--crossovers", action="store_true",
                   help="also time incremental inference at every crossover the planner costs")
    p.add_argument("--volume", action="store_true",
                   help="the 3D benchmark instead: a ResNet10-style 3D network on a volume, KQL "
                        "against a plain 3D loop and MONAI (its options: kql bench --volume --help)")
    return p


def _connection(args):
    from . import connect
    from .catalog.models import BUILTIN

    con = connect()
    spec, _ = build_model(args.model) if args.model != BUILTIN else (None, None)
    size = _size(args.size) if args.size else None
    if spec is not None:
        con.register_model(args.model, spec.module, spec.mean, spec.std, size or spec.input_size)
    elif size is not None:
        builtin = con.catalog.resolve_model(BUILTIN)
        con.register_model(BUILTIN, builtin.module, builtin.mean, builtin.std, size, builtin.labels)
    return con


def _size(text: str) -> tuple:
    """``'96x112'`` -> ``(96, 112)``.

    >>> _size("96x112")
    (96, 112)
    """
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise KqlError(f"--size must be HxW (e.g. 96x112), got '{text}'") from None
    if h < 1 or w < 1:
        raise KqlError(f"--size must be HxW with positive sides, got '{text}'")
    return h, w


def _check(args) -> None:
    from .catalog.models import BUILTIN, torchvision_builders

    if args.model != BUILTIN and args.model not in torchvision_builders():
        raise KqlError(f"unknown model '{args.model}': name a torchvision classifier "
                       f"(vgg16, resnet18, inception_v3, ...) or {BUILTIN}")
    for name in ("patch", "stride", "positions", "batch", "repeat"):
        if getattr(args, name) < 1:
            raise KqlError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.captum and args.no_captum:
        raise KqlError("--captum compares KQL with Captum: leave out --no-captum")
    if args.monai:
        from .bench_libraries import monai_overlap

        monai_overlap(args.patch, args.stride)          # a stride MONAI's windows can take
        if importlib.util.find_spec("monai") is None:
            raise KqlError("--monai needs MONAI: pip install monai")
    if args.threads is not None and args.threads < 1:
        raise KqlError(f"--threads must be at least 1, got {args.threads}")
    if args.plan_batch not in (None, "auto") and not (args.plan_batch.isdigit() and int(args.plan_batch) >= 1):
        raise KqlError(f"--plan-batch must be a batch size of at least 1 or 'auto', got {args.plan_batch!r}")
    if args.device == "cuda":
        from .planner.devices import require_cuda

        require_cuda("--device cuda", cls=KqlError)



def _bench(args) -> int:
    from .planner import calibrate

    _check(args)

    con = _connection(args)
    thread_count = args.threads or torch.get_num_threads()
    spec = con.catalog.resolve_model(args.model)
    h, w = spec.input_size
    full, (r0, r1) = _band_grid(args, h, w)
    y0, y1 = _pixel_rows(args, (r0, r1))
    _register_image(con, args, spec)
    stmt, text, queries = _queries(con, args, full, w, (y0, y1))
    settings = {"naive": {"strategy": "naive"},
                PURE: {"strategy": "incremental", "crossover": "none", "position_groups": "off",
                       "delta_convolutions": "off"},
                "chosen plan": {"strategy": "auto", "crossover": "auto", "gates": args.gates,
                                "tau": args.tau if args.tau is not None else "auto"}}
    engines, plans, planning = build_engines(con, args, spec, (stmt, text), queries, settings, (y0, y1))
    with calibrate.threads(thread_count):
        times, peaks, results = measure(engines, args)
    planning = {name: ts[1:] or ts for name, ts in planning.items()}  # the warm-up's left out
    report(args, spec, (h, w), plans, full, (r0, r1), times, peaks, results, thread_count, planning)
    return 0


def _band_grid(args, h: int, w: int):
    """The full occlusion grid of the image and the band's grid rows [r0, r1)."""
    from .planner.grid import OcclusionGrid

    full = OcclusionGrid(h, w, (args.patch,) * 2, (args.stride,) * 2)
    if full.problem():
        raise KqlError(full.problem())
    return full, band(*full.full_shape, args.positions)


def _pixel_rows(args, rows: tuple) -> tuple:
    """The pixel rows [y0, y1) the patches of grid rows [r0, r1) cover."""
    r0, r1 = rows
    return r0 * args.stride, (r1 - 1) * args.stride + args.patch


def _register_image(con, args, spec) -> None:
    # The sample at the model's input size: the band's REGION, in the image's own pixels,
    # is then in the model's pixels too.
    from .catalog import images

    h, w = spec.input_size
    photo = images.match_channels(images.load_sample(args.image), spec.channels)[0]
    con.register_image("bench_image", images.resize(photo, (h, w)))


def _queries(con, args, full, w: int, rows: tuple):
    """The band's statement and text at ``--batch``, and the engines' own queries where
    they differ: the chosen plan's (its batch, SSIM, drill-down) and naive's smaller band."""
    from .language.parser import parse

    (y0, y1), device = rows, "GPU" if args.device == "cuda" else "CPU"

    def occlude(batch: str) -> str:
        return (f"OCCLUDE bench_image USING {args.model} PATCH {args.patch} "
                f"STRIDE {args.stride} REGION (0, {y0}, {w}, {y1 - y0}){batch} ON {device}")
    text = occlude(f" BATCH {args.batch}")
    stmt = parse(text)[0]
    chosen_text = text
    if args.plan_batch is not None:
        chosen_text = occlude("" if args.plan_batch == "auto" else f" BATCH {int(args.plan_batch)}")
    chosen_text = _approximate(con, args, chosen_text)
    queries = {"chosen plan": (parse(chosen_text)[0], chosen_text)}
    if args.naive_positions:
        ny0, ny1 = _pixel_rows(args, band(*full.full_shape, args.naive_positions))
        naive_text = text.replace(f"REGION (0, {y0}, {w}, {y1 - y0})", f"REGION (0, {ny0}, {w}, {ny1 - ny0})")
        queries["naive"] = (parse(naive_text)[0], naive_text)
    return stmt, text, queries


def _approximate(con, args, text: str) -> str:
    """The chosen plan's ``text`` with ``--ssim`` (after ``--calibrate``'s CALIBRATE) and
    ``--drilldown``."""
    if args.ssim is not None:
        if args.calibrate:
            samples = ", ".join(f"sample('{name.strip()}')" for name in args.calibrate.split(","))
            print(con.execute(f"CALIBRATE {args.model} ON ({samples}) PATCH {args.patch} "
                              f"STRIDE {args.stride}").message)
        text += f" WITH SSIM >= {args.ssim}"
    if args.drilldown is not None:
        text += f" DRILLDOWN {args.drilldown}" + (f" SPEEDUP {args.speedup}" if args.speedup else "")
    return text
