"""Usage: python benchmarks/diagnostics/feature_probe.py runs/derived/<key> [train_split] [eval_split]

Do the gate inputs carry the part of an image's depth need that is real (not label noise)?

Target: each image's gain from depth, g = q_K - q_k per shallower exit k (per-image PQ). Its label noise is
measured with the two views: on the eval split, corr(g_plain, g_flip) is the reliability of one view's
gain, so a predictor that knew the true gain perfectly would correlate with one view's gain at
sqrt(reliability) (the ceiling below). A ridge regression fitted on the training split's view-averaged
gain is scored against each view of the eval split separately (the other view's noise is independent of
the features), for three inputs: the pooled gate features, the generator's kind alone (one-hot: the most
a kind-recognising gate can know), and both.
"""
import sys

import numpy as np

from eco_ray.derive.table import DerivedDataset
from eco_ray.metrics.panoptic import per_image_pq


def ridge(x_train, y_train, x_eval, alpha):
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_eval - mu) / sd
    a, b = np.hstack([a, np.ones((len(a), 1))]), np.hstack([b, np.ones((len(b), 1))])
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ y_train)
    return b @ w


def corr(a, b):
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0


ds = DerivedDataset.open(sys.argv[1])
tr, ev = ds.split(sys.argv[2] if len(sys.argv) > 2 else "train"), ds.split(sys.argv[3] if len(sys.argv) > 3 else "val")
kinds = sorted(set(tr.kinds) | set(ev.kinds))


def onehot(split):
    return np.stack([(split.kinds == k).astype(np.float32) for k in kinds], 1)


inputs = {"gate features": (tr.gate_features, ev.gate_features), "kind only": (onehot(tr), onehot(ev)),
          "features + kind": (np.hstack([tr.gate_features, onehot(tr)]), np.hstack([ev.gate_features, onehot(ev)]))}
q_tr, qv_ev = tr.quality, per_image_pq(ev.stats)  # (N, E) view-averaged; (N, V, E)
print(f"{len(tr)} {tr.split} images to fit, {len(ev)} {ev.split} images to score; gate input dim "
      f"{tr.gate_features.shape[1]}")
print(f"{'gain':<10}{'reliability':>12}{'ceiling':>9}  " + "  ".join(f"{n:>24}" for n in inputs))
for e, k in enumerate(ds.exits[:-1]):
    g_tr = q_tr[:, -1] - q_tr[:, e]
    g_plain, g_flip = qv_ev[:, 0, -1] - qv_ev[:, 0, e], qv_ev[:, 1, -1] - qv_ev[:, 1, e]
    reliability = corr(g_plain, g_flip)
    ceiling = np.sqrt(max(reliability, 0.0))
    cells = []
    for name, (x_tr, x_ev) in inputs.items():
        best = max((np.mean([corr(p, g_plain), corr(p, g_flip)]), alpha)
                   for alpha in (1.0, 10.0, 100.0, 1000.0)
                   for p in [ridge(x_tr, g_tr, x_ev, alpha)])
        cells.append(f"{best[0]:+.3f} ({best[0] / ceiling:.0%} of ceiling)" if ceiling > 0 else f"{best[0]:+.3f}")
    print(f"{'exit ' + str(k) + '->' + str(ds.exits[-1]):<10}{reliability:>+12.3f}{ceiling:>9.3f}  "
          + "  ".join(f"{c:>24}" for c in cells))
print("(cells: correlation of the prediction with one view's gain on the eval split, mean of the two views; best "
      "ridge alpha of 1/10/100/1000 - picked on the eval split, so slightly optimistic)")
