"""The plan the optimizer chooses, model by model and size by size, without running it.

For each model of the exactness suite and each input size it prints the operator line of
``EXPLAIN OCCLUDE ... PATCH 16 STRIDE 4 BATCH 16`` (operator, crossover, why naive,
whether it was planned without tracing): run it before and after a change to the cost
model or calibration to see which plans flip, then time only those (``kql bench``,
``benchmarks/small_inputs.py``). Each query plans as a first query ever (a new
connection, no layout trials on file). Random weights, torch's default threads.

Usage: .venv/bin/python benchmarks/plan_choices.py [--models vgg16,resnet18]
       [--sizes own,64x64,80x96,112x112]
"""
import argparse

import kql
from kql import bench
from kql.catalog import images

SUITE = ("vgg16,resnet18,inception_v3,mobilenet_v2,squeezenet1_1,regnet_y_400mf,regnet_x_400mf,"
         "mobilenet_v3_small,shufflenet_v2_x0_5,efficientnet_b0,efficientnet_lite0,googlenet,"
         "densenet121,resnext50_32x4d,convnext_tiny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=SUITE)
    parser.add_argument("--sizes", default="own,64x64,80x96,112x112",
                        help="HxW sizes; 'own' is the model's own (224x224, 299x299)")
    args = parser.parse_args()
    photo = images.match_channels(images.load_sample("chelsea"), 3)[0]
    for name in args.models.split(","):
        spec, _ = bench.build_model(name)
        for size in args.sizes.split(","):
            h, w = spec.input_size if size == "own" else (int(v) for v in size.split("x"))
            con = kql.connect()
            con.plan_cache.lasting = None
            con.plan_cache.learning = False      # the cost model alone (no feedback)
            con.register_model("m", spec.module, spec.mean, spec.std, (h, w))
            con.register_image("img", images.resize(photo, (h, w)))
            try:
                plan = con.execute("EXPLAIN OCCLUDE img USING m PATCH 16 STRIDE 4 BATCH 16").plan
                line = plan.splitlines()[1].strip()
            except kql.KqlError as exc:          # InceptionV3 refuses 64x64
                line = f"error: {exc}"
            print(f"{name:<20} {h}x{w:<8} {line}", flush=True)


if __name__ == "__main__":
    main()
