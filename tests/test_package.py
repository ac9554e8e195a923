"""An installed wheel works outside the source checkout: its resources (model presets, search spaces, pipeline
configs, the Serve config) are package data, found with importlib.resources from any directory."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed into a fresh virtual environment that borrows the test
    environment's third-party packages (not its editable eco-ray) through a path file."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(base / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((base / "dist").glob("eco_ray-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "_borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return {"bin": venv / "bin", "cwd": elsewhere}


def run(installed, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    return subprocess.run([str(installed["bin"] / "eco-ray"), *args], cwd=installed["cwd"], capture_output=True,
                          text=True, timeout=300, env=env)


def test_the_installed_package_is_not_the_checkout(installed):
    out = subprocess.run([str(installed["bin"] / "python"), "-c", "import eco_ray, sys; print(eco_ray.__file__)"],
                         cwd=installed["cwd"], capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in out and "site-packages" in out


def test_resources_are_found_from_any_directory(installed, tiny_derived):
    proc = run(installed, "sweep", "--help")
    assert proc.returncode == 0 and "--holdout" in proc.stdout
    proc = run(installed, "pipeline", "--config", "smoke", "--print-config")
    assert proc.returncode == 0 and "name: smoke" in proc.stdout, proc.stderr[-2000:]
    proc = run(installed, "cost", "--model", "tiny", "--no-latency", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["exits"], proc.stderr[-2000:]
    runs = installed["cwd"] / "runs"
    proc = run(installed, "gate", "--derived", tiny_derived["manifest"]["path"], "--beta", "0.1", "--set", "epochs=5",
               "--run-dir", str(runs), "--name", "g", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["beta"] == 0.1 and (runs / "gates" / "g" / "model.safetensors").is_file()
    from eco_ray.serve.run import load_serve_config  # the shipped Serve config, the same one deploy/ links to

    assert (ROOT / "deploy" / "serve_config.yaml").resolve().read_text() == \
        Path(__import__("eco_ray.resources", fromlist=["x"]).resource_path("serve", "serve_config")).read_text()
    assert load_serve_config()["applications"][0]["import_path"] == "eco_ray.serve.app:app_builder"
