"""The early-exit Deformable DETR against the unmodified library model; exits, gate input, loss, cost, errors."""

import json

import pytest
import torch

from eco_ray.config import ConfigError
from eco_ray.model.config import DetectionModelConfig, load_model_config
from eco_ray.model.cost import exit_cost_table
from eco_ray.model.early_exit_detr import STRIDE32_LEVEL, EarlyExitDeformableDetr
from eco_ray.model.io import (
    ModelFileError,
    build_parent,
    check_pretrained,
    load_parent,
    parent_from_blob,
    read_parent_blob,
    save_parent,
)
from eco_ray.model.postprocess import to_detections


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_parent(load_model_config("tiny", task="detection")).eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_deepest_exit_equals_the_library_model(model, batch):
    assert isinstance(model, EarlyExitDeformableDetr)
    ref = model.detr(batch)
    out = model(batch)
    assert out.exit_per_image.tolist() == [6, 6, 6] and len(out.class_logits) == model.config.decoder_layers
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=0, rtol=0)


@torch.no_grad()
def test_one_pass_multi_exit_equals_separate_forwards(model, batch):
    every = model.forward_exits(batch)
    assert sorted(every) == [2, 3, 4, 5, 6]
    for k, out in every.items():
        alone = model(batch, exit=k)
        for a, b in zip(out.class_logits + out.boxes, alone.class_logits + alone.boxes):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(every[2].pred_boxes, every[6].pred_boxes)  # the encoder depth changes the answer


@torch.no_grad()
def test_mixed_exits_in_a_batch_equal_per_image_forwards(model, batch):
    mixed = model.forward_per_image(batch, [4, 2, 6])
    assert mixed.exit_per_image.tolist() == [4, 2, 6]
    for i, k in enumerate([4, 2, 6]):
        alone = model(batch[i:i + 1], exit=k)
        torch.testing.assert_close(mixed.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed.pred_boxes[i], alone.pred_boxes[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not exits of this model"):
        model.forward_per_image(batch, [4, 1, 6])
    with pytest.raises(ValueError, match="one entry per image"):
        model.forward_per_image(batch, [4, 2])


@torch.no_grad()
def test_the_gate_input_is_the_pooled_stride32_level_before_any_encoder_layer(model, batch):
    features = model.backbone_features(batch)
    assert [f.shape[-1] for f, _ in features] == [16, 8, 4]  # strides 8, 16, 32 of a 128 px input
    want = model.body.input_proj[STRIDE32_LEVEL](features[STRIDE32_LEVEL][0]).mean(dim=(2, 3))
    torch.testing.assert_close(model(batch, exit=2).gate_features, want, atol=0, rtol=0)
    torch.testing.assert_close(model(batch, exit=2).gate_features, model(batch).gate_features, atol=0, rtol=0)
    torch.manual_seed(0)
    levels = build_parent(load_model_config("tiny", ["gate_input=levels"], task="detection")).eval()
    assert levels(batch).gate_features.shape == (3, 4 * model.config.hidden_dim)


def test_the_loss_trains_only_the_layers_an_exit_ran(model, batch):
    labels = [{"class_labels": torch.tensor([0, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.2, 0.7, 0.1, 0.1]])},
              {"class_labels": torch.tensor([5]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
              {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    model.train()
    try:
        model.zero_grad()
        loss = model.loss(model(batch, exit=3), labels)
        loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(loss) and loss > 0
    grads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
             for layer in model.body.encoder.layers]
    assert grads == [True, True, True, False, False, False]
    # a backbone learnt from scratch trains whole, its stem too (the library freezes it, for pretrained ones)
    stem = model.backbone.model.embedder
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in stem.modules())
    assert all(p.grad is not None for p in stem.parameters())
    model.zero_grad()
    frozen = build_parent(load_model_config("tiny", ["train_backbone=false"], task="detection"))
    assert not any(p.requires_grad for p in frozen.backbone.model.embedder.parameters())


@torch.no_grad()
def test_detections_and_the_cost_table(model, batch):
    out = model(batch[:2], exit=4)
    dets = to_detections(out, [11, 12, 13, 14, 15, 16], [(128, 128), (64, 256)])
    assert [len(d) for d in dets] == [100, 100]
    assert all(d["category_id"] in range(11, 17) and len(d["bbox"]) == 4 for d in dets[1])
    assert [d["score"] for d in dets[0]] == sorted((d["score"] for d in dets[0]), reverse=True)
    assert max(d["bbox"][0] + d["bbox"][2] for d in dets[1]) <= 256 + 1e-3  # boxes in the image's own pixels
    table = exit_cost_table(model, measure_latency=False)
    assert table["task"] == "detection" and [e["exit"] for e in table["exits"]] == [2, 3, 4, 5, 6]
    gflops = [e["encoder_gflops"] for e in table["exits"]]
    assert gflops == sorted(gflops) and gflops[0] > 0
    assert table["exits"][-1]["total_gflops"] == pytest.approx(
        table["backbone_gflops"] + sum(table["encoder_layer_gflops"]) + table["head_gflops"])


def test_bad_detector_configs_get_clear_errors():
    with pytest.raises(ConfigError, match="unknown detection model config 'huge'"):
        load_model_config("huge", task="detection")
    with pytest.raises(ConfigError, match="unknown task"):
        load_model_config("tiny", task="keypoints")
    with pytest.raises(ValueError, match="image_size must be >= 128"):
        DetectionModelConfig(image_size=64).validate()
    with pytest.raises(ValueError, match="exits must lie"):
        DetectionModelConfig(exits=[2, 7]).validate()
    cfg = load_model_config("tiny", task="detection")
    hf = cfg.to_hf()
    hf.two_stage, hf.with_box_refine = True, True
    from transformers import DeformableDetrForObjectDetection

    with pytest.raises(ValueError, match="two-stage"):
        EarlyExitDeformableDetr(cfg, DeformableDetrForObjectDetection(hf))


@torch.no_grad()
def test_a_detector_parent_round_trips_through_files_blobs_and_a_transformers_directory(model, batch, tmp_path):
    save_parent(model, tmp_path / "parent", extra={"categories": [{"id": 1, "name": "a"}]})
    loaded, meta = load_parent(tmp_path / "parent", task="detection")
    assert meta["task"] == "detection" and isinstance(loaded, EarlyExitDeformableDetr)
    shipped = parent_from_blob(read_parent_blob(tmp_path / "parent", task="detection"))
    for wrong in (load_parent, read_parent_blob):  # the panoptic tools refuse it with the reason
        with pytest.raises(ModelFileError, match="holds a detection parent; this takes a panoptic parent"):
            wrong(tmp_path / "parent")
    for other in (loaded, shipped):
        torch.testing.assert_close(other(batch, exit=3).pred_boxes, model(batch, exit=3).pred_boxes, atol=0, rtol=0)
    model.detr.save_pretrained(tmp_path / "hf")
    cfg = load_model_config("tiny", ["num_labels=6", "exits=[3,6]", "hidden_dim=64"], task="detection")
    started = build_parent(DetectionModelConfig(**{**cfg.__dict__, "pretrained": str(tmp_path / "hf")})).eval()
    assert started.config.hidden_dim == 32 and started.exits == [3, 6]  # architecture from the checkpoint
    # the same weights; frozen and trainable batch norm round differently (~1e-7)
    torch.testing.assert_close(started(batch).logits, model(batch).logits, atol=1e-6, rtol=1e-5)
    assert not any(p.requires_grad for p in started.backbone.model.embedder.parameters())  # pretrained: frozen
    with pytest.raises(ModelFileError, match="'deformable_detr'"):  # a segmenter's directory is not a detector's
        from transformers import Mask2FormerForUniversalSegmentation

        Mask2FormerForUniversalSegmentation(load_model_config("tiny").to_hf()).save_pretrained(tmp_path / "m2f")
        check_pretrained(tmp_path / "m2f", "detection")
    two_stage = model.detr.config.to_dict() | {"two_stage": True, "with_box_refine": True}
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "config.json").write_text(json.dumps(two_stage))
    with pytest.raises(ModelFileError, match="two-stage"):
        check_pretrained(tmp_path / "two", "detection")


@torch.no_grad()
def test_trainable_batch_norm_is_the_librarys_frozen_norm_in_eval(batch):
    """The swap of frozen batch norm for BatchNorm2d changes what trains, not the function: a library model
    with random norm statistics and its early-exit wrapper (which swaps) agree."""
    from transformers import DeformableDetrForObjectDetection

    torch.manual_seed(3)
    cfg = load_model_config("tiny", ["train_backbone=true"], task="detection")
    library = DeformableDetrForObjectDetection(cfg.to_hf()).eval()
    for name, buf in library.named_buffers():
        if "running_var" in name or name.endswith(".weight"):
            buf.uniform_(0.5, 2.0)
        elif "running_mean" in name or name.endswith(".bias"):
            buf.normal_(0, 0.3)
    reference = library(batch)
    wrapped = EarlyExitDeformableDetr(cfg, library).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in wrapped.backbone.modules())
    torch.testing.assert_close(wrapped(batch).logits, reference.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wrapped(batch).pred_boxes, reference.pred_boxes, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_a_mirrored_view_is_scored_in_the_images_own_frame(model, tmp_path):
    """evaluate_detector_exits(flip=True) predicts on the mirrored pixels and maps every box back, so both
    views are scored against the same ground truth; here against a manual pass on the mirrored batch."""
    from eco_ray.data.coco_instances import CocoInstancesDataset
    from eco_ray.data.collate import collate_detection
    from eco_ray.data.synth import SynthConfig, write_dataset
    from eco_ray.evaluate import evaluate_detector_exits

    write_dataset(tmp_path, SynthConfig(size=96, seed=2), {"val": 3}, workers=1)
    ds = CocoInstancesDataset.from_root(tmp_path, "val")
    ev = evaluate_detector_exits(model, ds, exits=[2, 6], flip=True)
    batch = collate_detection([ds[i] for i in range(3)], ds.labels, 128, flip=[True] * 3)
    manual = to_detections(model(batch["pixel_values"], exit=2), ds.category_ids, batch["sizes"])
    got = [d for d in ev.detections[2] if d["image_id"] == ds.image_ids[1]]
    want = manual[1]
    assert len(got) == len(want) == 100
    for g, w in zip(got, want):
        x, y, bw, bh = w["bbox"]
        assert g["bbox"] == pytest.approx([96 - x - bw, y, bw, bh]) and g["score"] == w["score"]
    assert set(ev.records) == {2, 6} and set(ev.records[6]) == set(ds.image_ids)
    assert ev.gate_features.shape == (3, model.config.hidden_dim)