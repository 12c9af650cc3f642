"""How far do the static-mHC Mix atoms move in a short GPT run? (issue 12; numbers in docs/mhc.md)

    python benchmarks/mix_movement.py --steps 200            # the library's init
    python benchmarks/mix_movement.py --steps 200 --equal-pre  # h_pre = 1/n (the init before issue 12)

Char-level tinyshakespeare (the first 200k characters), GPT(width 32, depth 2, heads 4, context 32,
residual="mhc", dynamic=False, Euclidean attention/MLP atoms by default), DualizeRetract(lr 0.2),
batch 8. Prints, per Mix atom, the distance
moved from init in its natural norm (max row/column ℓ1), the smallest entry, the diagonal, and the
largest marginal error seen.
"""
from __future__ import annotations

import argparse
import time

import torch

import modula_mhc as mm
from modula_mhc.compounds.hyper import HyperConnections
from modula_mhc.data import CharCorpus, default_corpus


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--equal-pre", action="store_true", help="h_pre = 1/n for every stream (old init)")
    ap.add_argument("--data", default=None, help="text file (default: the library's default corpus)")
    ap.add_argument("--manifold", default="euclidean", help="attention and MLP manifold (GPT's default is "
                    "stiefel/dgram; euclidean is faster and does not change what the Mix atoms see)")
    args = ap.parse_args()
    torch.manual_seed(0)
    text = open(args.data).read() if args.data else default_corpus()
    corpus = CharCorpus.from_text(text[:200_000], 32)
    gpt = mm.compounds.GPT(corpus.vocab_size, 32, 32, 2, 4, residual="mhc", dynamic=False,
                           attn_manifold=args.manifold, mlp_manifold=args.manifold)
    hcs = [m for m in gpt.modules() if isinstance(m, HyperConnections)]
    if args.equal_pre:
        with torch.no_grad():
            for hc in hcs:
                hc.static.weight[:hc.streams] = -torch.log(torch.tensor(float(hc.streams - 1)))
    opt = mm.optim.DualizeRetract(gpt, lr=args.lr)
    w0 = [hc.mix.weight.detach().clone() for hc in hcs]
    coeffs = {id(a): float(c) for a, c in zip(gpt.atoms(), gpt.norm_coefficients())}
    gen = torch.Generator().manual_seed(1)
    worst, t0 = 0.0, time.time()
    for step in range(args.steps):
        x, y = corpus.batch("train", 8, 32, generator=gen)
        loss = torch.nn.functional.cross_entropy(gpt(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        for hc in hcs:
            worst = max(worst, hc.mix.manifold.diagnostics(hc.mix.weight)["marginal_error"])
    print(f"{args.steps} steps, lr {args.lr}, equal_pre={args.equal_pre}: loss {loss.item():.3f}, "
          f"{time.time() - t0:.0f} s, worst marginal error {worst:.1e}")
    for i, (hc, w) in enumerate(zip(hcs, w0)):
        W = hc.mix.weight.detach()
        moved = float(hc.mix.weight_norm(W - w))
        print(f"layer {i}: coefficient {coeffs[id(hc.mix)]:.1f}, moved {moved:.4f} (natural norm), "
              f"min entry {float(w.min()):.4f} -> {float(W.min()):.4f}, "
              f"diagonal {[round(v, 3) for v in W.diagonal().tolist()]}")


if __name__ == "__main__":
    main()
