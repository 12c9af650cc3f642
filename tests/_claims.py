"""Measuring the analytic claims: norms of sequences, JVPs and second directional derivatives."""
from __future__ import annotations

import torch
from torch.func import functional_call, jvp


def seq_norm(y) -> torch.Tensor:
    """Max over tokens (all leading dims) of the per-token RMS; tuples: sum of the parts."""
    if isinstance(y, (tuple, list)):
        return sum(seq_norm(t) for t in y)
    return y.pow(2).mean(dim=-1).sqrt().max()


def unit_rms(x):
    """Rescale every token of x to RMS exactly 1 (a well-normed input)."""
    if isinstance(x, (tuple, list)):
        return type(x)(unit_rms(t) for t in x)
    return x / x.pow(2).mean(dim=-1, keepdim=True).sqrt()


def scale_to(x, target):
    """x rescaled so that seq_norm(x) == target."""
    n = seq_norm(x)
    if isinstance(x, (tuple, list)):
        return type(x)(t * (target / n) for t in x)
    return x * (target / n)


def input_jvp(f, x, dx):
    return jvp(f, (x,), (dx,))[1]


def input_second(f, x, dx, dx2):
    """D²f(x)[dx, dx2] by forward-over-forward differentiation."""
    g = lambda y: jvp(f, (y,), (dx,))[1]
    return jvp(g, (x,), (dx2,))[1]


def weight_fn(net, x):
    names = [n for n, _ in net.named_parameters()]
    return lambda *ws: functional_call(net, dict(zip(names, ws)), (x,))


def weight_jvp(net, x, dws):
    ws = tuple(p.detach() for p in net.parameters())
    return jvp(weight_fn(net, x), ws, tuple(dws))[1]


def weight_second(net, x, dws, dws2):
    ws = tuple(p.detach() for p in net.parameters())
    f = weight_fn(net, x)
    g = lambda *v: jvp(f, v, tuple(dws))[1]
    return jvp(g, ws, tuple(dws2))[1]


def mixed_second(net, x, dws, dx):
    """D²_{wx} f [Δw, Δx]."""
    names = [n for n, _ in net.named_parameters()]
    ws = tuple(p.detach() for p in net.parameters())
    f = lambda xx: jvp(lambda *v: functional_call(net, dict(zip(names, v)), (xx,)), ws, tuple(dws))[1]
    return jvp(f, (x,), (dx,))[1]


def power_direction(f, x, iters=8, seed=0):
    """Approximate top right-singular direction of the input Jacobian by power iteration in ℓ2."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(x, (tuple, list)):
        v = type(x)(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in x)
    else:
        v = torch.randn(x.shape, generator=g, dtype=x.dtype)
    for _ in range(iters):
        _, vjp_fn = torch.func.vjp(f, x)
        u = jvp(f, (x,), (v,))[1]
        (v,) = vjp_fn(u)
        flat = torch.cat([t.flatten() for t in (v if isinstance(v, (tuple, list)) else (v,))])
        nrm = flat.norm()
        v = type(v)(t / nrm for t in v) if isinstance(v, (tuple, list)) else v / nrm
    return v


def random_like_params(net, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) * scale for p in net.parameters()]
