"""benchmarks/gpu/run.py, the one-GPU run of the whole method, at its toy size on the CPU, with the cluster
stack made unimportable: it must need only torch, transformers, numpy, pyarrow, pillow and pyyaml."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "import sys\nfor m in ('omegaconf', 'ray', 'mlflow', 'optuna', 'pycocotools'):\n    sys.modules[m] = None\n"


@pytest.mark.slow
def test_the_gpu_run_needs_no_cluster_stack_and_writes_the_same_table(tmp_path):
    code = BLOCK + ("import runpy\nsys.argv = ['run.py', '--out', sys.argv[1], '--preset', 'toy']\n"
                    "runpy.run_path('benchmarks/gpu/run.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["parent"]["steps"] == 4 and [p["exit"] for p in report["static"]] == [0, 1, 2, 3, 4, 5, 6]
    assert report["diagnose"]["verdict"] in ("pays", "does not pay", "cannot tell yet")
    assert set(report["gates"]) == {"classify", "quality"} and report["costs"]["exits"][0]["encoder_gflops"] == 0
    from eco_ray.derive.table import DerivedDataset  # the table the cluster path reads, bit for bit the format

    ds = DerivedDataset.open(tmp_path / "out" / "derived")
    assert ds.split("val").stats.shape[:3] == (16, 2, 7) and len(ds.split("train")) == 32
