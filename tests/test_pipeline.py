"""``eco-ray pipeline`` end to end through the real CLI: a real local Ray, MLflow on SQLite, Serve on
localhost, real HTTP requests; then a rerun that reuses every stage, and ``--from`` forcing a stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "train_images=48", "val_images=16", "synth.size=64", "synth.seed=3",
    "train.model_preset=tiny", "train.steps=4", "train.num_workers=1", "train.batch_size=4", "train.eval_every=4",
    "train.eval_images=8", "train.checkpoint_every=2",
    "derive.chunk_size=8", "derive.batch_size=4", "derive.threshold=0.05", "derive.measure_latency=false",
    "sweep.trials=3", "sweep.concurrency=2", "requests=3", "port=8131",
]


def _pipeline(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "eco_ray.cli", "pipeline", "--json", "--set", f"run_dir={run_dir}"]
    for item in TINY:
        args += ["--set", item]
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(args + list(extra), capture_output=True, text=True, timeout=900, env=env,
                          cwd=Path(__file__).resolve().parents[1])


def _registered_versions(run_dir: Path, name: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


@pytest.mark.slow
def test_pipeline_runs_end_to_end_then_reuses_every_stage(tmp_path):
    run_dir = tmp_path / "runs"
    first = _pipeline(run_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    s = json.loads(first.stdout)
    state = json.loads((run_dir / "pipeline" / "default" / "state.json").read_text())
    assert list(state) == ["data", "train", "derive", "sweep", "select"]
    exits = state["derive"]["output"]["exits"]
    assert s["static_full_depth"]["exit"] == exits[-1]
    assert 0 <= s["eco_selected"]["pq"] <= 1 and s["eco_selected"]["encoder_gflops_mean"] > 0
    # the budget holds where the sweep scored its trials (held-out training images); the summary reports
    # the same gate on the validation split
    chosen = s["selection"]["chosen"]
    assert chosen["encoder_gflops_mean"] <= 0.7 * s["static_full_depth"]["encoder_gflops_mean"] + 1e-9
    assert "held out of every fit" in s["selection"]["why"]
    assert s["eco_selected"]["pq"] == chosen["val_pq"] and \
        s["eco_selected"]["encoder_gflops_mean"] == chosen["val_encoder_gflops_mean"]
    assert s["serving"]["requests"] == 3 and set(s["serving"]["exits_used"]) <= set(exits)
    assert s["serving"]["full_depth_check"]["exit"] == exits[-1]
    assert _registered_versions(run_dir, "eco-parent") == ["1"] and _registered_versions(run_dir, "eco-gate") == ["1"]

    again = _pipeline(run_dir, "--set", "requests=0")  # no serving check: nothing left to run
    assert again.returncode == 0, again.stderr[-4000:]
    assert "[pipeline] serve: skipped" in again.stderr
    for stage in ("data", "train", "derive", "sweep", "select"):
        assert f"[pipeline] {stage}: reused" in again.stderr
    s2 = json.loads(again.stdout)
    assert s2["eco_selected"] == s["eco_selected"] and s2["parent"] == s["parent"]
    assert _registered_versions(run_dir, "eco-parent") == ["1"] and _registered_versions(run_dir, "eco-gate") == ["1"]
    assert len(list((run_dir / "train").iterdir())) == 1

    forced = _pipeline(run_dir, "--from", "select", "--set", "requests=0")
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert "[pipeline] sweep: reused" in forced.stderr and "[pipeline] select: running" in forced.stderr
    assert _registered_versions(run_dir, "eco-gate") == ["1", "2"]


def test_a_bad_pipeline_setting_fails_before_any_work(tmp_path, capsys):
    from eco_ray.cli import main

    run_dir = tmp_path / "runs"
    for bad, named in (("budget=cheapest", "budget"), ("train.exit_sampling=sometimes", "exit_sampling"),
                       ("sweep.sampler=grid", "sampler"), ("limit=1.5", "limit"), ("synth.size=8", "size")):
        assert main(["pipeline", "--set", f"run_dir={run_dir}", "--set", bad]) == 2, bad
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, (bad, err)
    assert not run_dir.exists()


def test_a_mapping_setting_is_replaced_whole_or_changed_by_key(tmp_path):
    # kind_mix={clean: 0.5, relational: 0.5} means those two kinds only; it once merged into the default
    # mix and silently kept outline images (seen: a 2026-11-26 experiment ran with 23% outline)
    from eco_ray.config import load_config
    from eco_ray.data.synth import SynthConfig
    from eco_ray.pipeline import load_pipeline_config

    whole = load_pipeline_config(overrides=[f"run_dir={tmp_path}", "synth.kind_mix={clean: 0.5, relational: 0.5}",
                                            "synth.key_arm=0.06"])
    assert whole.data.synth.kind_mix == {"clean": 0.5, "relational": 0.5} and whole.data.synth.key_arm == 0.06
    # in any form (and under the section's own name): the mix given is the mix used
    one_key = load_pipeline_config(overrides=[f"run_dir={tmp_path}", "data.synth.kind_mix.clean=0.9"])
    assert one_key.data.synth.kind_mix == {"clean": 0.9}
    assert load_config(SynthConfig, overrides=["kind_mix.outline=1", "kind_mix.clean=2"]).kind_mix == \
        {"outline": 1.0, "clean": 2.0}
    yaml_file = tmp_path / "synth.yaml"
    yaml_file.write_text("kind_mix: {outline: 1}\nkey_arm: 0.05\n")
    assert load_config(SynthConfig, yaml_file).kind_mix == {"outline": 1.0}
    # the pipeline's own sections still merge key by key: a --set beside a --config keeps the file's settings
    pipe_yaml = tmp_path / "pipe.yaml"
    pipe_yaml.write_text("train: {steps: 7, exit_sampling: deep}\n")
    merged = load_pipeline_config(pipe_yaml, [f"run_dir={tmp_path}", "train.steps=9"])
    assert merged.train.steps == 9 and merged.train.exit_sampling == "deep"
    assert SynthConfig().kind_mix == {"clean": 0.4, "outline": 0.3, "relational": 0.3}  # defaults untouched


def test_the_config_tree_and_its_old_keys(tmp_path, capsys):
    """One typed tree: each stage's section is that stage's own config; the flat keys of the old layout move
    to their section, and settings the stages now hand on are refused with the name of what replaced them."""
    from eco_ray.cli import main
    from eco_ray.config import ConfigError
    from eco_ray.pipeline import load_pipeline_config
    from eco_ray.resources import resource_names

    old = tmp_path / "old.yaml"
    old.write_text("train_images: 50\nval_images: 10\nbudget: max_gflops\nlimit: 0.05\nrequests: 0\nport: 9000\n"
                   "synth: {size: 64}\ntrain: {steps: 7, model_preset: tiny}\n")
    cfg = load_pipeline_config(old)
    assert (cfg.data.train_images, cfg.data.val_images, cfg.data.synth.size) == (50, 10, 64)
    assert (cfg.select.budget, cfg.select.limit, cfg.serve.requests, cfg.serve.port) == ("max_gflops", 0.05, 0, 9000)
    assert cfg.train.steps == 7 and cfg.train.model.name == "tiny"  # the preset under the train section
    assert cfg.train.exit_sampling == "deepest_plus_one"  # the pipeline's own defaults for its sections
    for key, named in (("derive.parent=models:/x/1", "train stage"), ("sweep.derived=/tmp/t", "derive stage"),
                       ("train.run_dir=/tmp/r", "--run-dir"), ("train.data_root=/tmp/d", "data.root")):
        with pytest.raises(ConfigError, match=named):
            load_pipeline_config(overrides=[key])
    assert main(["pipeline", "--set", "derive.parent=x", "--print-config"]) == 2
    assert "no longer a setting" in capsys.readouterr().err
    assert {"smoke"} <= set(resource_names("pipelines"))
    assert load_pipeline_config("smoke").train.model_preset == "tiny"  # a shipped config by name
