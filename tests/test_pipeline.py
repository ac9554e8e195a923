"""``eco-ray pipeline``'s config tree and its checks before any work. The pipeline end to end (every stage, real
HTTP against Serve, a rerun that reuses the stages and ``--from`` forcing one) runs as a Ray job on a multi-node
cluster in tests/test_multinode.py, with the TINY settings below."""

import json

import pytest

TINY = [
    "train_images=48", "val_images=16", "synth.size=64", "synth.seed=3",
    "train.model_preset=tiny", "train.steps=4", "train.num_workers=1", "train.batch_size=4", "train.eval_every=4",
    "train.eval_images=8", "train.checkpoint_every=2",
    "derive.chunk_size=8", "derive.batch_size=4", "derive.threshold=0.05", "derive.measure_latency=false",
    "sweep.trials=3", "sweep.concurrency=2", "requests=3", "port=8131",
]


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


def test_generated_data_another_pipeline_replaced_is_generated_again(tmp_path):
    """Two pipelines on one run_dir generate into the same <run_dir>/data: the one whose settings are not the
    dataset's on disk makes its own again instead of reusing the other's."""
    from eco_ray.context import RunContext
    from eco_ray.data.synth import STAMP
    from eco_ray.pipeline import Pipeline, load_pipeline_config

    ctx = RunContext.create(tmp_path)
    small = ["data.train_images=3", "data.val_images=2", "data.synth.size=32"]
    log: list[str] = []
    a = Pipeline(load_pipeline_config(overrides=small), ctx, log=log.append)
    b = Pipeline(load_pipeline_config("detection", [*small, "data.train_images=4"]), ctx, log=log.append)
    a.data(), b.data()
    assert log.count("[pipeline] data: running") == 2
    stamp = json.loads((tmp_path / "data" / STAMP).read_text())
    assert stamp["request"]["splits"] == {"train": 4, "val": 2}
    log.clear()
    Pipeline(load_pipeline_config(overrides=small), ctx, log=log.append).data()  # a's settings again
    assert "[pipeline] data: running" in log and "[pipeline] data: reused" not in "\n".join(log)
    assert json.loads((tmp_path / "data" / STAMP).read_text())["request"]["splits"] == {"train": 3, "val": 2}
    log.clear()
    Pipeline(load_pipeline_config(overrides=small), ctx, log=log.append).data()
    assert any(line.startswith("[pipeline] data: reused") for line in log)
