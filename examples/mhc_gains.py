"""Composite gains of the residual mixing across depth: HC (unconstrained) vs mHC (Sinkhorn).

Two settings:
  1. a deep random stack: 64 layers whose H_res comes from random logits L (std 1.5):
     mHC uses Sinkhorn(exp(L)), HC uses I + s·L/1.5 for a few drift sizes s;
  2. GPT(residual="hc") and GPT(residual="mhc") (width 64, depth 8), static logits perturbed by the
     same noise, measured on random tokens with ``stability_report``.
Prints the numbers and writes runs/examples/mhc_gains.png (git-ignored); the committed figure is
regenerated only when asked (--out takes a folder, like the other examples, or a figure file):

    python examples/mhc_gains.py [--out docs/figures | --out docs/figures/mhc_gains.png]
"""
from __future__ import annotations

import argparse
import os
import pathlib

import torch

from modula_mhc import atoms, bonds, compounds
from modula_mhc.algebra import Compose
from modula_mhc.compounds import HyperConnections, stability_report


def random_stack(constrained, layers=64, streams=4, std=1.5, drift=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for _ in range(layers):
        hc = HyperConnections(atoms.Linear(4, 4) @ bonds.RMSNorm(), streams=streams, constrained=constrained, width=4)
        L = std * torch.randn(streams, streams, generator=g)
        with torch.no_grad():
            n = streams
            hc.static.weight[2 * n:] = (L if constrained else torch.eye(n) + drift * L / std).flatten()
        mods.append(hc)
    return Compose(*mods)


def perturbed_gpt(residual, noise=0.3, depth=8, seed=0):
    torch.manual_seed(seed)
    gpt = compounds.GPT(vocab_size=65, context=64, width=64, depth=depth, heads=4, residual=residual, streams=4,
                        attn_manifold="euclidean", mlp_manifold="euclidean")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in gpt.modules():
            if isinstance(m, HyperConnections):
                w = m.static.weight
                w[8:] += noise * torch.randn(16, generator=g) * (1.0 if m.constrained else 0.25)
    return gpt


#: the figure's file name when --out is a folder
FIGURE = "mhc_gains.png"


def figure_path(ap, out):
    """The file --out names: a folder (one that exists, or a path ending in a separator or without a
    suffix) gets FIGURE inside it; otherwise a figure file in a format matplotlib writes."""
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir() and not path.suffix:
        ap.error(f"--out {out!r} is a file without a suffix: give a folder or a figure file (.png, .pdf, …)")
    if out.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return path / FIGURE
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        ap.error(f"--out {out!r}: neither a folder nor a figure file (.{', .'.join(sorted(formats))})")
    return path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "runs" / "examples"),
                    help=f"output folder, where {FIGURE} is written (default runs/examples, git-ignored; --out "
                         f"docs/figures regenerates the committed figure), or a figure file (.png, .pdf, .svg, …)")
    args = ap.parse_args(argv)
    args.out = figure_path(ap, args.out)
    return args


def main(argv=None):
    args = parse_args(argv)

    curves = {}
    rep = stability_report(random_stack(True))
    curves["mHC, Sinkhorn(exp(L)), std 1.5"] = rep["composite_forward_gain"], rep["composite_backward_gain"]
    print(f"random stack, 64 layers, mHC: composite forward {rep['final_composite_forward_gain']:.4f}, "
          f"backward {rep['final_composite_backward_gain']:.4f}, max Sinkhorn marginal error "
          f"{rep['max_marginal_error']:.2e}, max backward over depth {max(rep['composite_backward_gain']):.4f}")
    for drift in (0.05, 0.1, 0.2):
        rep = stability_report(random_stack(False, drift=drift))
        curves[f"HC, I + {drift}·L/1.5"] = rep["composite_forward_gain"], rep["composite_backward_gain"]
        print(f"random stack, 64 layers, HC drift {drift}: composite forward {rep['final_composite_forward_gain']:.4g}, "
              f"backward {rep['final_composite_backward_gain']:.4g}")
    gpt_curves = {}
    for residual in ("mhc", "hc"):
        rep = stability_report(perturbed_gpt(residual))
        gpt_curves[residual] = rep["composite_forward_gain"], rep["composite_backward_gain"]
        print(f"GPT width 64, depth 8 (16 HC layers), {residual}, perturbed static logits, random tokens: "
              f"composite forward {rep['final_composite_forward_gain']:.4g}, backward "
              f"{rep['final_composite_backward_gain']:.4g}, max marginal error {rep['max_marginal_error']}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, (fwd, bwd) in curves.items():
        line, = axes[0].semilogy(range(1, len(fwd) + 1), fwd, label=label + " (fwd)")
        axes[0].semilogy(range(1, len(bwd) + 1), bwd, ls="--", color=line.get_color())
    axes[0].set_title("64-layer random stack: composite gain")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("max abs row sum (—) / column sum (- -)")
    axes[0].legend(fontsize=7)
    for label, (fwd, bwd) in gpt_curves.items():
        line, = axes[1].semilogy(range(1, len(fwd) + 1), fwd, marker="o", ms=3, label=f"{label} (fwd)")
        axes[1].semilogy(range(1, len(bwd) + 1), bwd, ls="--", color=line.get_color(), label=f"{label} (bwd)")
    axes[1].set_title("GPT (depth 8), perturbed static mixing")
    axes[1].set_xlabel("hyper-connected branch")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return out


if __name__ == "__main__":
    main()
