"""Usage: python benchmarks/diagnostics/parent_eval.py PARENT_DIR_OR_CHECKPOINT N_IMAGES THRESHOLDS [THREADS]
(dataset runs/data8k; a checkpoint is read with runs/train/small-8k/config.yaml).
Evaluate a parent checkpoint or dir at all exits for several score thresholds (one forward per batch)."""
import sys, numpy as np, torch, time
from safetensors.torch import load_model
from eco_ray.data import CocoPanopticDataset
from eco_ray.data.collate import pixel_values
from eco_ray.data.transforms import build_transform
from eco_ray.metrics.panoptic import aggregate, image_stats, PanopticStats
from eco_ray.model.postprocess import to_panoptic
from eco_ray.train.config import load_train_config
from eco_ray.model.io import build_parent, load_parent
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
src, n = sys.argv[1], int(sys.argv[2]); ths = [float(t) for t in sys.argv[3].split(",")]
if src.endswith("parent"):
    m, _ = load_parent(src)
else:
    cfg = load_train_config("runs/train/small-8k/config.yaml"); m = build_parent(cfg.model); load_model(m, src + "/model.safetensors")
m.eval()
val = CocoPanopticDataset.from_root("runs/data8k", "val")
tr = build_transform(128, train=False); rng = np.random.default_rng(0)
stats = {t: {k: [] for k in m.exits} for t in ths}; kinds = []
t0 = time.perf_counter()
for s0 in range(0, n, 16):
    samples = [tr(val[i], rng) for i in range(s0, min(n, s0 + 16))]
    kinds += [s.meta.get("eco_kind") for s in samples]
    with torch.no_grad(): out = m.forward_exits(pixel_values([s.image for s in samples]))
    for t in ths:
        for k in m.exits:
            for (idm, segs), s in zip(to_panoptic(out[k], val.categories, (128, 128), t), samples):
                stats[t][k].append(image_stats(s.id_map, s.segments, idm, segs, val.categories))
print(f"{n} images, {time.perf_counter()-t0:.0f}s")
kinds = np.array(kinds)
for t in ths:
    row = []
    for k in m.exits:
        r = aggregate(PanopticStats.stack(stats[t][k]), val.categories)
        row.append(f"{k}: {r.pq:.3f}/{r.pq_things:.3f}/{r.pq_stuff:.3f}")
    print(f"th {t}: " + "  ".join(row))
t = ths[0]; k = m.exits[-1]
S = PanopticStats.stack(stats[t][k])
for kind in sorted(set(kinds)):
    r = aggregate(S[kinds == kind], val.categories)
    print(f"  th {t} exit {k} {kind}: PQ {r.pq:.3f} things {r.pq_things:.3f} stuff {r.pq_stuff:.3f}")
r = aggregate(S, val.categories)
names = [c.name for c in val.categories.categories]
print("  per class PQ:", {nm: round(float(v), 3) for nm, v in zip(names, r.per_class_pq)})
