"""Usage: python benchmarks/diagnostics/parent_confusion.py PARENT_DIR N_IMAGES (dataset runs/data8k).
Which class the best-overlapping predicted segment of each ground-truth segment has (IoU > 0.5), at exit 6."""
import sys, numpy as np, torch
from safetensors.torch import load_model
from eco_ray.data import CocoPanopticDataset
from eco_ray.data.collate import pixel_values
from eco_ray.data.transforms import build_transform
from eco_ray.model.postprocess import to_panoptic
from eco_ray.train.config import load_train_config
from eco_ray.model.io import build_parent, load_parent
torch.set_num_threads(1)
src, n = sys.argv[1], int(sys.argv[2])
if src.endswith("parent"): m, _ = load_parent(src)
else:
    cfg = load_train_config("runs/train/small-8k/config.yaml"); m = build_parent(cfg.model); load_model(m, src + "/model.safetensors")
m.eval(); val = CocoPanopticDataset.from_root("runs/data8k", "val"); cats = val.categories
names = [c.name for c in cats.categories] + ["(none)"]
C = len(cats); conf = np.zeros((C, C + 1), int); ious = []
tr = build_transform(128, train=False); rng = np.random.default_rng(0)
for s0 in range(0, n, 16):
    samples = [tr(val[i], rng) for i in range(s0, min(n, s0 + 16))]
    with torch.no_grad(): out = m(pixel_values([s.image for s in samples]), exit=6)
    for (idm, segs), s in zip(to_panoptic(out, cats, (128, 128)), samples):
        for g in s.segments:
            gm = s.id_map == g["id"]; best, bc = 0.0, C
            for p in segs:
                pm = idm == p["id"]; iou = (gm & pm).sum() / max((gm | pm).sum(), 1)
                if iou > best: best, bc = iou, cats.index(p["category_id"])
            gi = cats.index(g["category_id"])
            if best > 0.5: conf[gi, bc] += 1; ious.append(best)
            else: conf[gi, C] += 1
print("rows: GT class; cols: class of the best-overlapping predicted segment (IoU>0.5), else (none)")
print(" " * 10 + " ".join(f"{x[:7]:>7}" for x in names))
for i in range(C): print(f"{names[i][:9]:>9} " + " ".join(f"{v:>7}" for v in conf[i]))
print("mean IoU of matched", np.mean(ious))
