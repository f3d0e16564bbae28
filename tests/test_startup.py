"""Start-up: the built-in model's labels ship with KQL, so its first query needs no torchvision."""

import subprocess
import sys
import textwrap


def test_shipped_labels_are_torchvision_s():
    from torchvision.models import ResNet18_Weights

    from kql.catalog.models import imagenet_labels

    assert imagenet_labels() == list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def test_a_built_in_query_does_not_import_torchvision():
    code = textwrap.dedent("""
        import sys, kql
        r = kql.connect().execute("EXPLAIN OCCLUDE sample('chelsea') USING efficientnet_lite0 PATCH 64 STRIDE 64")
        assert "IncrementalOcclusion" in r.plan or "NaiveOcclusion" in r.plan
        print("torchvision" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
