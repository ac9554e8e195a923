import sys
import numpy as np
from eco_ray.derive.table import DerivedDataset, relative_costs
from eco_ray.metrics.panoptic import pq_contributions, per_image_pq, totals_summary
from eco_ray.tradeoff import choose
ds = DerivedDataset.open(sys.argv[1]); va = ds.split("val")
g = ds.costs("gflops"); rel = relative_costs(g); it = ds.categories.isthing
st = va.eval_stats
static = np.array([totals_summary(st[:, e].sum_images(), it)["pq"] for e in range(len(ds.exits))])
def lead(choice):
    pq = totals_summary(st[np.arange(len(va)), choice].sum_images(), it)["pq"]
    c = g[choice].mean()
    return pq - np.interp(c, g, static), c
dpq = pq_contributions(va.stats)  # (N, V, E)
q = per_image_pq(va.stats)
for beta in (0.02, 0.05, 0.1, 0.3, 1.0):
    a = lead(choose(q[:, 1], rel, beta)); b = lead(choose(dpq[:, 1], rel, beta)); o = lead(choose(dpq[:, 0], rel, beta))
    print(f"beta {beta}: cross-view pq {a[0]:+.4f}@{a[1]:.4f}  cross-view dpq {b[0]:+.4f}@{b[1]:.4f}   same-view dpq {o[0]:+.4f}")
