"""The early-exit model against the unmodified library model, its gates, weights on disk, post-processing."""

import numpy as np
import pytest
import torch

from eco_ray.config import ConfigError
from eco_ray.data import CocoPanopticDataset, collate_panoptic
from eco_ray.metrics import aggregate, image_stats
from eco_ray.model.config import load_model_config
from eco_ray.model.early_exit import EarlyExitMask2Former
from eco_ray.model.gates import ExitClassifierGate, QualityGate, build_gate, decide
from eco_ray.model.io import ModelFileError, load_gate, load_parent, parent_from_pretrained, save_gate, save_parent
from eco_ray.model.postprocess import to_panoptic


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EarlyExitMask2Former(load_model_config("tiny")).eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def assert_same(a, b, atol=0.0):
    for x, y in zip(a.class_logits + a.mask_logits, b.class_logits + b.mask_logits):
        torch.testing.assert_close(x, y, atol=atol, rtol=0 if atol == 0 else 1e-5)


@torch.no_grad()
def test_deepest_exit_equals_the_library_model(model, batch):
    ref = model.m2f(batch, output_auxiliary_logits=True)
    out = model(batch)  # deepest exit by default
    assert out.exit_per_image.tolist() == [6, 6, 6]
    torch.testing.assert_close(out.class_queries_logits, ref.class_queries_logits, atol=0, rtol=0)
    torch.testing.assert_close(out.masks_queries_logits, ref.masks_queries_logits, atol=0, rtol=0)
    for aux, c, m in zip(ref.auxiliary_logits, out.class_logits[:-1], out.mask_logits[:-1]):
        torch.testing.assert_close(c, aux["class_queries_logits"], atol=0, rtol=0)
        torch.testing.assert_close(m, aux["masks_queries_logits"], atol=0, rtol=0)


@torch.no_grad()
def test_one_pass_multi_exit_equals_separate_forwards(model, batch):
    every = model.forward_exits(batch)
    assert sorted(every) == [2, 3, 4, 5, 6]
    for k, out in every.items():
        assert_same(out, model(batch, exit=k))
    # exits really differ: the encoder depth changes the prediction
    assert not torch.allclose(every[2].masks_queries_logits, every[6].masks_queries_logits)


@torch.no_grad()
def test_mixed_exits_in_a_batch_equal_per_image_forwards(model, batch):
    exits = torch.tensor([4, 2, 6])
    mixed = model.forward_per_image(batch, exits)
    assert mixed.exit_per_image.tolist() == [4, 2, 6]
    for i, k in enumerate(exits.tolist()):
        alone = model(batch[i:i + 1], exit=k)
        torch.testing.assert_close(mixed.class_queries_logits[i], alone.class_queries_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed.masks_queries_logits[i], alone.masks_queries_logits[0], atol=1e-5, rtol=1e-5)
    same = model.forward_per_image(batch, [3, 3, 3])
    assert_same(same, model(batch, exit=3), atol=1e-6)


@torch.no_grad()
def test_exit_zero_and_a_pooled_coarse_backbone(batch):
    """Exit 0 runs no encoder layer (the heads on the projected backbone maps); with pooled coarse levels the
    stride-16/32 maps come from the stride-8 map, so a far-away pixel cannot change a token except through
    the encoder."""
    torch.manual_seed(0)
    m = EarlyExitMask2Former(load_model_config("tiny", ["exits=[0,1,3,6]", "pooled_coarse_levels=true"])).eval()
    every = m.forward_exits(batch)
    assert sorted(every) == [0, 1, 3, 6] and not torch.allclose(every[0].masks_queries_logits, every[1].masks_queries_logits)
    mixed = m.forward_per_image(batch, [0, 6, 1])
    for i, k in enumerate([0, 6, 1]):
        torch.testing.assert_close(mixed.masks_queries_logits[i], every[k].masks_queries_logits[i], atol=1e-5, rtol=1e-5)
    assert m.forward_per_image(batch, [0, 0, 0]).exit_per_image.tolist() == [0, 0, 0]
    # the stride-32 map's top-left token (pixels 0-31, plus stage 2's reach) does not see the bottom-right corner
    big = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    far = big.clone()
    far[:, :, 96:, 96:] += 5.0
    torch.testing.assert_close(m.backbone_features(big)[3][:, :, 0, 0], m.backbone_features(far)[3][:, :, 0, 0])
    full = EarlyExitMask2Former(load_model_config("tiny")).eval()
    assert not torch.allclose(full.backbone_features(big)[3][:, :, 0, 0], full.backbone_features(far)[3][:, :, 0, 0])
    with pytest.raises(ConfigError, match="ResNet"):
        load_model_config("tiny", ["backbone=swin", "pooled_coarse_levels=true"])


@torch.no_grad()
def test_gate_features_are_per_image_and_depth_independent(model, batch):
    feats = model.forward_exits(batch, [2, 6])
    assert feats[2].gate_features.shape == (3, 32)
    torch.testing.assert_close(feats[2].gate_features, feats[6].gate_features, atol=0, rtol=0)
    alone = model(batch[1:2], exit=2).gate_features
    torch.testing.assert_close(alone[0], feats[2].gate_features[1], atol=1e-6, rtol=1e-5)


def test_levels_gate_input_pools_every_level_before_the_encoder(model, batch):
    plain = model(batch, exit=2).gate_features
    model.config.gate_input = "levels"
    try:
        levels = model(batch, exit=2).gate_features
    finally:
        model.config.gate_input = "stride32"
    assert levels.shape == (3, 3 * plain.shape[1])
    torch.testing.assert_close(levels[:, :plain.shape[1]], plain)  # the stride-32 part comes first


def test_bad_exits_are_rejected(model, batch):
    with pytest.raises(ValueError, match="not exits"):
        model(batch, exit=1)
    with pytest.raises(ValueError, match="not exits"):
        model.forward_per_image(batch, [2, 7, 2])
    with pytest.raises(ValueError, match="one entry per image"):
        model.forward_per_image(batch, [2, 2])
    with pytest.raises(ConfigError, match="exits"):
        load_model_config("tiny", ["exits=[2,9]"])
    with pytest.raises(ConfigError, match="unknown model config"):
        load_model_config("huge")


def test_loss_trains_only_the_layers_an_exit_uses(model, synth_root):
    ds = CocoPanopticDataset.from_root(synth_root, "val")
    b = collate_panoptic([ds[0], ds[1]], ds.categories)
    model.train()
    try:
        model.zero_grad()
        loss = model.loss(model(b["pixel_values"], exit=3), b["mask_labels"], b["class_labels"])
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        layers = model.pixel_decoder.encoder.layers
        used = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[i].parameters()) for i in range(6)]
        assert used == [True, True, True, False, False, False]
    finally:
        model.zero_grad()
        model.eval()


def test_swin_backbone_config_builds_and_exits():
    m = EarlyExitMask2Former(load_model_config("tiny", ["backbone=swin", "backbone_embed=32",
                                                         "swin_num_heads=[1,2,4,8]", "swin_window=4"])).eval()
    with torch.no_grad():
        out = m.forward_exits(torch.randn(1, 3, 64, 64), [2, 6])
    assert out[2].masks_queries_logits.shape == (1, 8, 16, 16)


# ---------------------------------------------------------------------------------------------- gates
def test_classifier_gate_decides_per_image():
    gate = ExitClassifierGate(4, [2, 3, 4, 5, 6])
    with torch.no_grad():
        gate.linear.weight.zero_()
        gate.linear.bias.zero_()
        gate.linear.weight[4, 0] = 1.0  # feature 0 votes for exit 6
        gate.linear.weight[1, 1] = 1.0  # feature 1 votes for exit 3
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]])
    exits = np.asarray(gate.exits)
    # a classifier's decision ignores beta (it was trained for one)
    for beta in (0.0, 10.0):
        assert exits[decide(gate, x, [2, 3, 4, 5, 6], beta)].tolist() == [6, 3, 2]  # equal logits: the shallowest


def test_quality_gate_trades_quality_for_cost():
    gate = QualityGate(2, [2, 4, 6])
    with torch.no_grad():
        gate.net.weight.zero_()
        gate.net.bias.copy_(torch.tensor([0.5, 0.75, 0.8125]))  # predicted quality per exit (exact binary)
    x = torch.zeros(3, 2)
    costs = [1.0, 2.0, 3.0]
    exits = np.asarray(gate.exits)
    assert exits[decide(gate, x, costs, 0.0)].tolist() == [6, 6, 6]
    assert exits[decide(gate, x, costs, 0.0625)].tolist() == [4, 4, 4]  # utilities .4375, .625, .625: tie -> shallower
    assert exits[decide(gate, x, costs, 0.25)].tolist() == [2, 2, 2]  # .25, .25, .0625: tie -> shallower
    assert exits[decide(gate, x, costs, np.asarray([0.0, 0.0625, 1.0]))].tolist() == [6, 4, 2]  # beta per image
    with pytest.raises(ValueError, match="costs"):
        decide(gate, x, [1.0, 2.0], 0.1)
    # a budget allows only some exits: the best of those
    assert exits[decide(gate, x, costs, 0.0, allowed=np.asarray([True, True, False]))].tolist() == [4, 4, 4]
    # gates saved under the quality gate's old kind name load as a quality gate
    assert type(build_gate({"kind": "budget", "in_dim": 2, "exits": [2, 4, 6]})) is QualityGate


# ------------------------------------------------------------------------------------ weights on disk
def test_parent_round_trips_bit_exactly(model, batch, tmp_path):
    save_parent(model, tmp_path / "parent", extra={"categories": [{"id": 1, "name": "x", "isthing": 1}]})
    loaded, meta = load_parent(tmp_path / "parent")
    assert meta["categories"][0]["name"] == "x" and meta["model"]["exits"] == [2, 3, 4, 5, 6]
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with torch.no_grad():
        assert_same(model(batch, exit=4), loaded(batch, exit=4))


def test_gates_round_trip(tmp_path):
    for gate in (ExitClassifierGate(8, [2, 4, 6]), QualityGate(8, [2, 4, 6], hidden=16)):
        save_gate(gate, tmp_path / gate.kind, extra={"beta": 0.01})
        loaded, meta = load_gate(tmp_path / gate.kind)
        assert meta["beta"] == 0.01 and type(loaded) is type(gate)
        for p1, p2 in zip(gate.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(p1, p2)


def test_broken_model_directories_are_clear_errors(model, tmp_path):
    with pytest.raises(ModelFileError, match="not an eco-ray parent"):
        load_parent(tmp_path)
    save_gate(ExitClassifierGate(8, [2, 4]), tmp_path / "g")
    with pytest.raises(ModelFileError, match="expected a 'parent'"):
        load_parent(tmp_path / "g")
    save_parent(model, tmp_path / "p")
    save_gate(ExitClassifierGate(8, [2, 4]), tmp_path / "p2")
    (tmp_path / "p" / "model.safetensors").write_bytes((tmp_path / "p2" / "model.safetensors").read_bytes())
    with pytest.raises(ModelFileError, match="does not match"):
        load_parent(tmp_path / "p")


def test_start_from_a_local_pretrained_directory(model, batch, tmp_path):
    model.m2f.save_pretrained(tmp_path / "hf")  # safetensors, the layout of a downloaded checkpoint
    started = parent_from_pretrained(tmp_path / "hf", load_model_config("tiny")).eval()
    with torch.no_grad():
        assert_same(started(batch, exit=5), model(batch, exit=5))
    relabelled = parent_from_pretrained(tmp_path / "hf", load_model_config("tiny", ["num_labels=3"]))
    assert relabelled.m2f.class_predictor.out_features == 4


# ------------------------------------------------------------------------------------ post-processing
def test_postprocess_gives_valid_panoptic_maps(model, synth_root):
    ds = CocoPanopticDataset.from_root(synth_root, "val")
    samples = [ds[i] for i in range(4)]
    b = collate_panoptic(samples, ds.categories)
    with torch.no_grad():
        out = model(b["pixel_values"], exit=2)
    preds = to_panoptic(out, ds.categories, (64, 64), threshold=0.0)  # untrained: keep every query
    stats = []
    for (id_map, segments), s in zip(preds, samples):
        assert id_map.shape == (64, 64) and id_map.dtype == np.int64
        assert set(np.unique(id_map).tolist()) - {0} == {seg["id"] for seg in segments}
        assert all(seg["category_id"] in ds.categories for seg in segments)
        stuff = [seg["category_id"] for seg in segments if not ds.categories.isthing[ds.categories.index(seg["category_id"])]]
        assert len(stuff) == len(set(stuff))  # one segment per stuff category
        stats.append(image_stats(s.id_map, s.segments, id_map, segments, ds.categories))
    from eco_ray.metrics import PanopticStats
    r = aggregate(PanopticStats.stack(stats), ds.categories)
    assert 0.0 <= r.pq < 1.0  # an untrained model is scored, not perfect


def _logits_for(label: int, score: float, num_classes: int) -> list[float]:
    """Class logits (num_classes + 1 with the void class) whose softmax gives ``score`` to ``label``."""
    rest = (1 - score) / num_classes
    return [float(np.log(score if c == label else rest)) for c in range(num_classes + 1)]


def test_postprocess_follows_mask2former_semantics(synth_root):
    """Hand-built queries: a moderately scored thing with a confident mask is kept (transformers' version
    drops it), stuff of one class is fused, void / low-score / mostly-overlapped queries give no segment."""
    from eco_ray.model.early_exit import ExitOutput

    cats = CocoPanopticDataset.from_root(synth_root, "val").categories  # 6 things, then 3 stuff
    n, size = len(cats), 8
    yy, xx = np.mgrid[0:size, 0:size]
    left, right, bottom = xx < 4, (xx >= 4) & (yy < 6), (xx >= 4) & (yy >= 6)
    queries = [  # (label, score, mask)
        (0, 0.5, left),  # thing at score 0.5, mask probability 0.9: kept
        (6, 0.9, right),  # stuff
        (6, 0.8, bottom),  # the same stuff class: fused with the one above
        (n, 0.9, left),  # the void class: dropped
        (1, 0.3, right),  # below the score threshold: dropped
        (2, 0.45, left | right),  # loses most of its mask to better queries: dropped (overlap < 0.8)
    ]
    logits = torch.tensor([[_logits_for(lab, s, n) for lab, s, _ in queries]])
    masks = torch.tensor(np.stack([np.where(m, 2.2, -4.0) for _, _, m in queries])[None], dtype=torch.float32)
    out = ExitOutput([logits], [masks], torch.zeros(1, 4), torch.tensor([6]))
    (id_map, segments), = to_panoptic(out, cats, (size, size), threshold=0.4)
    assert [(s["category_id"], round(s["score"], 3)) for s in segments] == [(cats.ids[0], 0.5), (cats.ids[6], 0.9)]
    thing, stuff = segments[0]["id"], segments[1]["id"]
    assert (id_map[left] == thing).all() and (id_map[right | bottom] == stuff).all()


def test_overlap_threshold_decides_a_partly_covered_query(synth_root):
    """A query keeps a segment only if it wins at least ``overlap_threshold`` of its own mask: one that wins
    half of it is dropped at Mask2Former's 0.8 and kept, with the half it won, at 0.4."""
    from eco_ray.model.early_exit import ExitOutput
    from eco_ray.model.postprocess import OVERLAP_THRESHOLD

    cats = CocoPanopticDataset.from_root(synth_root, "val").categories
    n, size = len(cats), 8
    left = np.mgrid[0:size, 0:size][1] < 4
    queries = [(0, 0.9, left), (1, 0.6, np.ones_like(left))]  # the second loses the left half to the first
    logits = torch.tensor([[_logits_for(lab, s, n) for lab, s, _ in queries]])
    masks = torch.tensor(np.stack([np.where(m, 2.2, -4.0) for _, _, m in queries])[None], dtype=torch.float32)
    out = ExitOutput([logits], [masks], torch.zeros(1, 4), torch.tensor([6]))
    assert OVERLAP_THRESHOLD == 0.8
    (_, strict), = to_panoptic(out, cats, (size, size))
    (id_map, loose), = to_panoptic(out, cats, (size, size), overlap_threshold=0.4)
    assert [s["category_id"] for s in strict] == [cats.ids[0]]
    assert [s["category_id"] for s in loose] == [cats.ids[0], cats.ids[1]]
    assert (id_map[~left] == loose[1]["id"]).all()

