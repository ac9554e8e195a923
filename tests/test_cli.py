"""The eco-ray command line, run as a user runs it (a subprocess of the installed console script)."""

import json
import subprocess
import sys

import pytest


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "eco_ray.cli", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def test_synth_then_report(tmp_path):
    out = tmp_path / "data"
    summary = json.loads(run("data", "synth", "--out", str(out), "--train", "20", "--val", "8", "--size", "48",
                             "--set", "kind_mix.relational=0.6", "--json").stdout)
    assert summary["splits"]["train"]["images"] == 20 and summary["config"]["kind_mix"]["relational"] == 0.6
    report = json.loads(run("data", "report", "--root", str(out), "--json").stdout)
    for split in ("train", "val"):
        assert report["splits"][split]["self_check"]["pq"] == 1.0
    assert run("data", "check", "--root", str(out), "--split", "val").returncode == 0
    # the same request again reuses the dataset; a different one refuses instead of mixing datasets
    same = run("data", "synth", "--out", str(out), "--train", "20", "--val", "8", "--size", "48",
               "--set", "kind_mix.relational=0.6")
    assert "reusing" in same.stdout
    again = run("data", "synth", "--out", str(out), "--train", "2", "--val", "2", check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    run("data", "synth", "--out", str(out), "--train", "3", "--val", "2", "--size", "48", "--overwrite")
    report = json.loads(run("data", "report", "--root", str(out), "--json").stdout)
    assert report["splits"]["train"]["images"] == 3


@pytest.mark.parametrize("override, key", [("size=abc", "size"), ("nosuchkey=1", "nosuchkey"),
                                           ("max_overlap=3", "max_overlap")])
def test_bad_config_value_names_the_key(tmp_path, override, key):
    proc = run("data", "synth", "--out", str(tmp_path / "d"), "--set", override, check=False)
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = run("data", "report", "--root", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "panoptic_train.json" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_every_command():
    text = run("data", "synth", "--help").stdout
    for flag in ("--out", "--train", "--val", "--size", "--seed", "--set", "--overwrite"):
        assert flag in text


def test_the_parser_offers_the_pipelines_stages():
    from eco_ray.cli.parser import STAGES as offered
    from eco_ray.pipeline.config import STAGES

    assert offered == STAGES
