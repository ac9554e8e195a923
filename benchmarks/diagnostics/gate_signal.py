"""Usage: python benchmarks/diagnostics/gate_signal.py runs/derived/<key>
Does the gate pick the right images? Gate vs random assignment with the same exit histogram; how
consistent the per-image shallowest sufficient exit is between the two views; ranking power of the features."""
import sys, numpy as np
from eco_ray.derive.table import DerivedDataset, relative_costs
from eco_ray.gate.fit import GateConfig, fit_gate, gate_choice
from eco_ray.metrics.panoptic import aggregate, per_image_pq
from eco_ray.tradeoff import shallowest_sufficient
ds = DerivedDataset.open(sys.argv[1]); tr, va = ds.split("train"), ds.split("val")
rel = relative_costs(ds.costs("gflops")); rng = np.random.default_rng(0)
for kind, beta in (("classify", 0.02), ("classify", 0.1), ("budget", 0.1), ("budget", 0.3)):
    g = fit_gate(tr.gate_features, tr.quality, rel, ds.exits, GateConfig(kind=kind, beta=beta))
    ch = gate_choice(g, va.gate_features, rel, beta)
    pq = aggregate(va.eval_stats[np.arange(len(va)), ch], ds.categories).pq
    rand = [aggregate(va.eval_stats[np.arange(len(va)), rng.permutation(ch)], ds.categories).pq for _ in range(200)]
    print(f"{kind} beta={beta}: gate PQ {pq:.4f}; same exit histogram at random {np.mean(rand):.4f} +- {np.std(rand):.4f} "
          f"(gate beats {np.mean(np.array(rand) < pq):.0%} of random draws)")
qv = per_image_pq(va.stats)  # (N, V, E)
s_plain, s_flip = shallowest_sufficient(qv[:, 0]), shallowest_sufficient(qv[:, 1])
h1 = np.bincount(s_plain, minlength=5) / len(va); h2 = np.bincount(s_flip, minlength=5) / len(va)
print(f"sufficient exit, plain view {np.bincount(s_plain, minlength=5).tolist()}, flip view {np.bincount(s_flip, minlength=5).tolist()}")
print(f"agreement between views {np.mean(s_plain == s_flip):.3f}; expected if independent {float((h1 * h2).sum()):.3f}")
need = (shallowest_sufficient(tr.quality) > 0).astype(int); needv = (shallowest_sufficient(va.quality) > 0).astype(int)
from sklearn.metrics import roc_auc_score
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
sc = StandardScaler().fit(tr.gate_features)
clf = LogisticRegression(max_iter=2000).fit(sc.transform(tr.gate_features), need)
print(f"'needs more than exit 2' (view-averaged): train share {need.mean():.2f}, val share {needv.mean():.2f}; "
      f"linear probe AUC on val {roc_auc_score(needv, clf.predict_proba(sc.transform(va.gate_features))[:, 1]):.3f}")
for name in ("num_objects",):
    print(f"AUC of num_objects alone on val: {roc_auc_score(needv, va.num_objects):.3f}")
for kind in sorted(set(va.kinds)):
    sel = va.kinds == kind
    print(f"  {kind}: share needing > exit 2 {needv[sel].mean():.2f}")
