"""The compact derived table: sparse statistics equal the dense computation to the last bit, the files are
memory-mapped (one copy per node), old (schema 1) tables still read, and the COCO-shaped synthetic table goes
through the same code a sweep trial runs. Pure numpy and files: no Ray."""

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from eco_ray.bootstrap import weighted_totals
from eco_ray.derive.table import DerivedDataError, DerivedDataset, DerivedSplit, migrate, write_manifest, write_split
from eco_ray.derive.synthetic import coco_like_categories, synthetic_split
from eco_ray.metrics import CategorySet, PanopticStats, aggregate, per_image_pq, stats_to_arrow
from eco_ray.metrics.panoptic import pq_contributions
from eco_ray.metrics.sparse import SparseStats
from eco_ray.tradeoff import evaluate_assignment, select_rows, static_points

FIELDS = ("iou_sum", "tp", "fp", "fn", "sem_inter", "sem_union")


def dense_table(rng, n=300, views=2, exits=5, c=133, per_image=6):
    """COCO-like sparsity: each image holds ``per_image`` of ``c`` categories, some only in predictions."""
    shape = (n, views, exits, c)
    present = np.zeros((n, 1, 1, c), bool)
    for i in range(n):
        present[i, 0, 0, rng.choice(c, per_image, replace=False)] = True
    tp = rng.integers(0, 3, shape) * present
    fp = rng.integers(0, 2, shape) * present
    fn = rng.integers(0, 2, shape) * present
    inter = rng.integers(0, 10**6, shape) * present
    return PanopticStats(tp * rng.uniform(0.5, 1.0, shape), tp, fp, fn, inter,
                         inter + rng.integers(0, 10**5, shape) * present)


def bits_equal(a: PanopticStats, b: PanopticStats) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype.kind == getattr(b, k).dtype.kind
               for k in FIELDS)


@pytest.mark.parametrize("c", [2, 9, 133])
def test_any_assignment_scores_exactly_as_the_dense_table(c):
    rng = np.random.default_rng(c)
    dense = dense_table(rng, c=c, per_image=min(6, c))
    sparse = SparseStats.from_dense(dense)
    assert bits_equal(sparse.to_dense(), dense) and sparse.entries == 300 * min(6, c)  # only the present pairs
    cats = CategorySet([{"id": i + 1, "name": str(i), "isthing": int(i % 3 > 0)} for i in range(c)])
    costs, exits = {"encoder_gflops": [1.0, 2, 3, 4, 5], "layers": [2, 3, 4, 5, 6]}, [2, 3, 4, 5, 6]
    plain = dense[:, 0]
    for trial in range(20):  # random assignments, and every static one
        choice = rng.integers(0, 5, len(plain.tp))
        assert bits_equal(sparse.inner(0).totals(choice), select_rows(plain, choice).sum())
        a = evaluate_assignment(sparse.inner(0), choice, cats, costs, exits)
        b = evaluate_assignment(plain, choice, cats, costs, exits)  # the dense path
        assert a == b  # every field, to the last bit
    assert static_points(sparse.inner(0), cats, costs, exits) == static_points(plain, cats, costs, exits)
    assert bits_equal(sparse.inner(0).totals(), plain.sum_images())
    # per-image quantities: computed on dense blocks by the same functions, so bit-identical
    assert np.array_equal(sparse.per_image(per_image_pq), per_image_pq(dense))
    assert np.array_equal(sparse.per_image(lambda b: pq_contributions(b, totals=sparse.totals(), images=len(sparse))),
                          pq_contributions(dense))
    # the bootstrap's weighted sums: counts exact, IoU sums to rounding
    w = rng.multinomial(len(sparse), np.full(len(sparse), 1 / len(sparse)), size=30)
    got, want = sparse.inner(0).weighted_totals(w, choice), weighted_totals(select_rows(plain, choice), w)
    np.testing.assert_array_equal(got["tp"], want.tp)
    np.testing.assert_allclose(got["iou_sum"], want.iou_sum, rtol=1e-12)


def test_selection_and_concatenation_keep_every_entry():
    rng = np.random.default_rng(0)
    dense = dense_table(rng, n=50, c=20)
    sparse = SparseStats.from_dense(dense)
    order = rng.permutation(50)
    assert bits_equal(sparse.take(order).to_dense(), dense[order])
    mask = rng.random(50) < 0.3
    assert bits_equal(sparse.take(mask).to_dense(), dense[mask])
    halves = SparseStats.concat([sparse.take(np.arange(20)), sparse.take(np.arange(20, 50))])
    assert bits_equal(halves.to_dense(), dense)
    assert bits_equal(sparse.inner((slice(None), [1, 3])).to_dense(), dense[:, :, [1, 3]])
    assert sparse.values["tp"].dtype == np.int32 and sparse.values["iou_sum"].dtype == np.float64
    big = replace(dense, sem_union=dense.sem_union * 10**4)  # pixel counts beyond int32 stay int64, exact
    wide = SparseStats.from_dense(big)
    assert wide.values["sem_union"].dtype == np.int64 and bits_equal(wide.to_dense(), big)
    with pytest.raises(ValueError, match="one exit index per image"):
        sparse.inner(0).totals(np.zeros(3, int))
    with pytest.raises(ValueError, match="exit indices"):
        sparse.inner(0).totals(np.full(50, 5))


def split_of(dense: PanopticStats, rng, name="val") -> DerivedSplit:
    n = dense.tp.shape[0]
    return DerivedSplit(name, np.arange(1, n + 1), [2, 3, 4, 5, 6], ["plain", "flip"], dense,
                        rng.normal(size=(n, 8)).astype(np.float32), np.asarray(["k"] * n, dtype=object),
                        np.full(n, 3, np.int64))


def manifest_for(cats, splits) -> dict:
    return {"key": "t", "exits": [2, 3, 4, 5, 6], "views": ["plain", "flip"], "categories": cats.to_coco(),
            "costs": {"exits": [{"exit": k, "encoder_gflops": float(k)} for k in (2, 3, 4, 5, 6)]},
            "splits": {s: {} for s in splits}, "parent": {"uri": "x"}}


def test_the_files_are_memory_mapped_and_a_schema_1_table_still_reads(tmp_path):
    rng = np.random.default_rng(1)
    cats = coco_like_categories()
    split = split_of(dense_table(rng, n=120), rng)
    write_split(tmp_path, split)
    write_manifest(tmp_path, manifest_for(cats, ["val"]))
    back = DerivedDataset.open(tmp_path).split("val")
    assert bits_equal(back.dense_stats(), split.dense_stats())
    assert np.array_equal(back.gate_features, split.gate_features) and list(back.kinds) == list(split.kinds)
    for array in (back.stats.values["iou_sum"], back.stats.category, back.gate_features):
        assert not array.flags.writeable and not array.flags.owndata  # views of the mapped file, not copies
    assert np.array_equal(back.quality_per_view, per_image_pq(split.dense_stats()))

    old = tmp_path / "v1"  # the schema-1 layout: dense lists per image row, in Parquet
    old.mkdir()
    table = stats_to_arrow(split.image_ids, split.dense_stats())
    import pyarrow as pa
    feats = pa.FixedSizeListArray.from_arrays(pa.array(split.gate_features.reshape(-1)), 8)
    table = (table.add_column(1, "kind", pa.array(list(split.kinds))).add_column(2, "num_objects",
             pa.array(split.num_objects)).add_column(3, "gate_features", feats))
    table = table.replace_schema_metadata({**table.schema.metadata, b"eco_ray.exits": json.dumps(split.exits).encode(),
                                           b"eco_ray.views": json.dumps(split.views).encode()})
    pq.write_table(table, old / "val.parquet")
    (old / "manifest.json").write_text(json.dumps({"schema_version": 1, **manifest_for(cats, ["val"])}))
    v1 = DerivedDataset.open(old).split("val")
    assert bits_equal(v1.dense_stats(), split.dense_stats())
    assert migrate(old) and not (old / "val.parquet").exists() and not migrate(old)
    v2 = DerivedDataset.open(old)
    assert v2.manifest["schema_version"] == 2 and bits_equal(v2.split("val").dense_stats(), split.dense_stats())

    (tmp_path / "val.stats.arrow").write_bytes(b"not arrow")
    with pytest.raises(DerivedDataError, match="val.stats.arrow is not a derived table"):
        DerivedDataset.open(tmp_path).split("val")


def test_a_coco_shaped_synthetic_table_goes_through_a_trial(tmp_path, capsys):
    from eco_ray.cli import main
    from eco_ray.gate.config import GateConfig
    from eco_ray.gate.evaluate import fit_and_evaluate

    cats = coco_like_categories()
    split = synthetic_split("train", 400, cats, seed=0)
    per_image = np.diff(split.stats.offsets)
    assert len(cats) == 133 and 8 < per_image.mean() < 16  # COCO-like: ~11 segments, a few false positives
    assert bits_equal(SparseStats.from_dense(split.dense_stats()).to_dense(), split.dense_stats())  # canonical
    root = tmp_path / "syn"
    assert main(["data", "synth-table", "--out", str(root), "--train", "400", "--val", "150"]) == 0
    assert main(["data", "synth-table", "--out", str(root)]) == 2  # never over a table
    assert "holds a derived table" in capsys.readouterr().err
    ds = DerivedDataset.open(root)
    fit = fit_and_evaluate(ds, GateConfig(kind="quality", batch_size=64, patience=40), [0.05], holdout=0.25)
    e = fit.evaluations[0]
    static = {p.exit: p.pq for p in fit.static}
    assert static[6] > static[2] and 0 < e.gate.pq <= 1 and e.holdout_gate is not None
    dense_val = ds.split("val").dense_stats()[:, 0]  # the trial's number, recomputed on the dense table
    assert aggregate(dense_val[np.arange(150), np.full(150, 4)], ds.categories).pq == static[6]


def test_mini_batches_and_early_stopping():
    from eco_ray.gate.config import GateConfig
    from eco_ray.gate.fit import fit_gate

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6)).astype(np.float32)
    q = np.stack([0.5 + 0.2 * np.tanh(x[:, 0]), np.full(600, 0.6)], 1)
    cfg = GateConfig(kind="quality", batch_size=100, epochs=2000, patience=30, lr=0.05)
    a, b = fit_gate(x, q, np.array([0.5, 1.0]), [2, 3], cfg), fit_gate(x, q, np.array([0.5, 1.0]), [2, 3], cfg)
    assert a.steps < 2000 and a.steps == b.steps  # stopped early, deterministically
    assert all(np.array_equal(p.detach().numpy(), r.detach().numpy()) for p, r in zip(a.parameters(), b.parameters()))
    full = fit_gate(x, q, np.array([0.5, 1.0]), [2, 3], GateConfig(kind="quality", epochs=50))
    assert full.steps == 50 and GateConfig().effective_batch_size(1000) == 1000
    assert all(np.array_equal(p.detach().numpy(), r.detach().numpy())
               for p, r in zip(full.state_dict().values(), full_batch_reference(x, q, 50).state_dict().values()))
    assert GateConfig().effective_batch_size(10**6) == 4096 and GateConfig(batch_size=0).effective_batch_size(10**6) == 10**6
    with pytest.raises(ValueError, match="batch_size"):
        GateConfig(batch_size=-1).validate()


def test_block_by_block_equals_all_at_once_and_edge_cases(tmp_path, monkeypatch):
    import eco_ray.metrics.sparse as sparse_module

    rng = np.random.default_rng(3)
    dense = dense_table(rng, n=90, c=40)
    sparse = SparseStats.from_dense(dense)
    choice = rng.integers(0, 5, 90)
    w = rng.multinomial(90, np.full(90, 1 / 90), size=7)
    monkeypatch.setattr(sparse_module, "_BLOCK_BYTES", 4096)  # a few images per block
    assert np.array_equal(sparse.per_image(per_image_pq), per_image_pq(dense))
    blocks = sparse.inner(0).weighted_totals(w, choice)
    want = weighted_totals(select_rows(dense[:, 0], choice), w)
    np.testing.assert_array_equal(blocks["fn"], want.fn)
    np.testing.assert_allclose(blocks["iou_sum"], want.iou_sum, rtol=1e-12)
    with pytest.raises(ValueError, match="exit indices"):
        sparse.inner(0).weighted_totals(w, np.full(90, -1))
    assert bits_equal(sparse.take([-1]).to_dense(), dense[[-1]])

    split = split_of(dense, rng)
    q = split.quality_per_view
    split.stats = dense_table(rng, n=90, c=40)  # new statistics: converted, and nothing cached survives
    assert isinstance(split.stats, SparseStats) and not np.array_equal(split.quality_per_view, q)
    empty = split.subset(np.zeros(90, bool))
    write_split(tmp_path, empty)
    write_manifest(tmp_path, manifest_for(coco_like_categories(), ["val"]))
    back = DerivedDataset.open(tmp_path).split("val")
    assert len(back) == 0 and back.gate_features.shape == (0, 8) and back.quality.shape == (0, 5)
    assert SparseStats.from_dense(PanopticStats.zeros((0, 2, 5, 4))).shape == (0, 2, 5, 4)


def full_batch_reference(x, q, epochs):
    """The full-batch fit as it was written before mini-batches: the whole gate forward at every step."""
    import torch
    from torch import nn

    from eco_ray.model.gates import QualityGate

    torch.manual_seed(0)
    xt = torch.as_tensor(x)
    gate = QualityGate(xt.shape[1], [2, 3], 0)
    qt = torch.as_tensor(q, dtype=torch.float32)
    target = qt - qt[:, -1:]
    gate.norm.fit(xt)
    opt = torch.optim.AdamW([p for p in gate.parameters() if p.requires_grad], lr=0.01, weight_decay=1e-4)
    gate.train()
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = nn.MSELoss()(gate(xt), target)
        loss.backward()
        opt.step()
    return gate.eval()
