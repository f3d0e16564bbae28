"""3D occlusion of a CT-sized volume: KQL's plan against the plain PyTorch loop and MONAI.

The benchmark lives in the package (``kql bench --volume``, :mod:`kql.bench_volumes`);
this is its command under benchmarks/, the one the README quotes:

  .venv/bin/python benchmarks/volumes.py --rounds 3 --plain-positions 256
"""
import sys

from kql.bench_volumes import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
