"""Adversarial sweep of the certified Stiefel / DGram dualize: 180 cold solves, every one rechecked.

Both manifolds; shapes 96×48, 48×96, 128×32, 32×128, 64×64; nine gradient kinds (Gaussian, rank 2
and 4, a rank-1 spike over 0.1% / 3% / 10% noise floors, condition numbers 1e2 and 1e6, Student-t
entries with 4 degrees of freedom); 2 seeds; DGram points with column norms spread over 1e4. Each
solve's certificate is recomputed with an SVD in float64 (‖Ĝ + 2ŴΛ‖_* bounds every feasible
⟨Ĝ, A⟩) and its ratio to ⟨Ĝ, A⟩ compared with the default gap. Iteration counts are deterministic,
so the sweep is a measure of the solver, not of the machine.

    python benchmarks/dual_sweep.py            # writes benchmarks/results/dual_sweep.json
"""
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from modula_mhc.manifolds import DGram, Stiefel  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = [(96, 48), (48, 96), (128, 32), (32, 128), (64, 64)]
KINDS = ["gauss", "rank2", "rank4", "spike0.001", "spike0.03", "spike0.1", "cond1e2", "cond1e6", "student_t"]


def gradient(kind, m, n, g):
    """An adversarial gradient of shape (m, n) in float64."""
    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == "gauss":
        return randn(m, n)
    if kind.startswith("rank"):
        r = int(kind[4:])
        return randn(m, r) @ randn(r, n)
    if kind.startswith("spike"):
        G = randn(m, 1) @ randn(1, n)
        return G + float(kind[5:]) * G.norm() / math.sqrt(m * n) * randn(m, n)
    if kind.startswith("cond"):
        k = min(m, n)
        U = torch.linalg.qr(randn(max(m, n), k))[0]
        V = torch.linalg.qr(randn(k, k))[0]
        X = U @ torch.diag(torch.logspace(0, -math.log10(float(kind[4:])), k, dtype=torch.float64)) @ V.T
        return X if m >= n else X.T
    z, chi = randn(m, n), randn(4, m, n).square().mean(0)  # Student-t, 4 degrees of freedom: heavy tails
    return z / (chi / 2).sqrt().clamp_min(1e-6) * math.sqrt(2 / 4)


def _test_points():
    """``point`` of tests/test_dual_certificate.py: the sweep and the tests draw the same points."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "test_dual_certificate.py")
    spec = importlib.util.spec_from_file_location("_dual_certificate_points", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.point


def certified_ratio(name, W, G, A, certificate):
    """⟨Ĝ, A⟩ / ‖Ĝ + 2ŴΛ‖_* recomputed in float64 (Ĝ = G·√n/‖G‖_F, Ŵ DGram's RMS-normalised point)."""
    wide = W.shape[0] < W.shape[1]
    Wt, Gt, At = (W.T, G.T, A.T) if wide else (W, G, A)
    n = Wt.shape[1]
    if name == "dgram":
        Wt = Wt / (Wt.norm() / math.sqrt(n))
    Gn = Gt * (math.sqrt(n) / Gt.norm())
    return float((Gn * At).sum() / torch.linalg.svdvals(Gn + 2 * Wt @ certificate.double()).sum())


def cases():
    for name in ("stiefel", "dgram"):
        for m, n in SHAPES:
            for kind in KINDS:
                for seed in (0, 1):
                    yield name, m, n, kind, seed


def main():
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(it, **_):
            return it
    manifolds = {"stiefel": Stiefel(), "dgram": DGram()}
    point = _test_points()
    rows = []
    start = time.perf_counter()
    for name, m, n, kind, seed in tqdm(list(cases()), desc="solves"):
        manifold = manifolds[name]
        g = torch.Generator().manual_seed(1000 * seed + 10 * SHAPES.index((m, n)) + KINDS.index(kind))
        W, G = point(name, m, n, g), gradient(kind, m, n, g)
        state = {}
        A = manifold.dualize(W, G, state)
        ratio = certified_ratio(name, W, G, A, state["certificate"])
        rows.append({"manifold": name, "shape": [m, n], "kind": kind, "seed": seed,
                     "iterations": state["iterations"], "certified": state["certified"],
                     "ratio": ratio})
    seconds = time.perf_counter() - start
    summary = {}
    for name in ("stiefel", "dgram"):
        its = [r["iterations"] for r in rows if r["manifold"] == name]
        summary[name] = {"solves": len(its), "iterations_total": sum(its), "iterations_max": max(its),
                         "all_certified": all(r["certified"] for r in rows if r["manifold"] == name),
                         "worst_ratio": min(r["ratio"] for r in rows if r["manifold"] == name)}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "dual_sweep.json"), "w") as f:
        json.dump({"summary": summary, "seconds": seconds, "rows": rows}, f, indent=1)
    for name, s in summary.items():
        print(f"{name:8s} {s['solves']} solves, iterations {s['iterations_total']} in all, at most "
              f"{s['iterations_max']}, all certified: {s['all_certified']}, worst ratio {s['worst_ratio']:.5f}")
    print(f"{seconds:.0f} s; benchmarks/results/dual_sweep.json")


if __name__ == "__main__":
    main()
