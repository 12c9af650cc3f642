"""Stacked Stiefel/DGram dual solves (``GramManifold._dualize_stack``): each member of a stack gets the
answer, the iteration count, the warm start and the state it would get dualized alone from the same
state, whatever its neighbours are (no tangent part, certified at once, warm or cold, a state left
by another manifold). Every answer is also checked for unit spectral norm, tangency and its
certificate, rechecked with an SVD as in tests/test_dual_certificate.py."""
from __future__ import annotations

import math

import pytest
import torch

from modula_mhc.manifolds import DGram, Stiefel, dual_ascent
from modula_mhc.manifolds.dual_ascent import off_diagonal

# One thread (conftest.one_thread): The claims here are maths that no thread count changes, on
# tensors too small for a second thread to help: it only contends for the cores (this file: 4 s
# either way on an idle 2-core machine, 21 s with 2 threads and 7 s with 1 on a busy one).
pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def _spike(g, m, n):
    """Rank 1 over a 0.3% noise floor: a member that needs many iterations."""
    G = _rand(g, m, 1) @ _rand(g, 1, n)
    return G + 0.003 * G.norm() / math.sqrt(m * n) * _rand(g, m, n)


def _normal(M, W, g):
    """A gradient without tangent part: W·S, S symmetric (zero diagonal for DGram)."""
    S = _rand(g, W.size(-1), W.size(-1))
    S = S + S.T
    return W @ (off_diagonal(S) if M.name == "dgram" else S)


def _copy(st):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}


def _valid(M, W, G, A, st):
    """Unit spectral norm (0 without tangent part), tangency, types, and the certificate by SVD."""
    n = W.size(-1)
    assert isinstance(st["iterations"], int) and isinstance(st["certified"], bool)
    assert isinstance(st["warm_start"], bool)
    top = float(torch.linalg.matrix_norm(A.double(), 2))
    if st["iterations"] == 0:
        assert top == 0.0
        return
    assert abs(top - 1) < 1e-6
    Wn = W / (W.norm() / math.sqrt(n)) if M.name == "dgram" else W
    C = Wn.T @ A + A.T @ Wn
    cn = Wn.norm(dim=0)
    C = C / (cn[:, None] * cn[None, :])
    assert float((off_diagonal(C) if M.name == "dgram" else C).abs().max()) < 1e-6
    assert st["certificate"].shape == (n, n)
    Gn = G * (math.sqrt(n) / G.norm())
    upper = torch.linalg.svdvals(Gn + 2 * Wn @ st["certificate"].double()).sum()
    ratio = float((Gn * A).sum() / upper)
    assert ratio <= 1 + 1e-9
    if st["certified"]:
        assert ratio >= 1 - M.gap_tol * (1 + 1e-6)


def _alone_and_stacked(M, W, G, states):
    """(answers, states) of each member dualized alone, then of the stack, from copies of ``states``."""
    alone, alone_states = [], []
    for j in range(W.size(0)):
        st = _copy(states[j])
        alone.append(M.dualize(W[j], G[j], st))
        alone_states.append(st)
    stacked_states = [_copy(st) for st in states]
    A = M._dualize_stack(W, G, stacked_states)
    for j in range(W.size(0)):
        _valid(M, W[j], G[j], A[j], stacked_states[j])
    return alone, alone_states, A, stacked_states


def _same(alone, alone_states, A, stacked_states):
    for j, (a, sa, sb) in enumerate(zip(alone, alone_states, stacked_states)):
        assert (sa["iterations"], sa["warm_start"]) == (sb["iterations"], sb["warm_start"]), j
        assert set(sa) == set(sb), (j, set(sa) ^ set(sb))
        assert float((a - A[j]).abs().max()) <= 1e-12, j
        for key in ("certificate", "dual_step", "dual_smoothing"):
            if key in sa:
                assert torch.allclose(sa[key], sb[key], rtol=1e-12, atol=1e-12), (j, key)


@pytest.mark.parametrize("name", ["stiefel", "dgram"])
@pytest.mark.parametrize("shape", [(24, 8), (8, 8)], ids=["tall", "square"])
def test_member_without_tangent_part_does_not_run_the_loop(name, shape):
    """A purely normal (and a zero) gradient next to a normal one: A = 0 with 0 iterations, as
    alone, and its warm start kept. Before, it stayed in the loop to the 1000-iteration cap."""
    M = Stiefel() if name == "stiefel" else DGram()
    g = torch.Generator().manual_seed(0)
    W = torch.stack([M.random(shape, generator=g, dtype=F64) for _ in range(3)])
    G = torch.stack([_normal(M, W[0], g), torch.zeros(shape, dtype=F64), _rand(g, *shape)])
    _same(*_alone_and_stacked(M, W, G, [{}, {}, {}]))
    warm: dict = {}
    M.dualize(W[0], _rand(g, *shape), warm)  # a member keeps its warm start through a normal gradient
    _same(*_alone_and_stacked(M, W, G, [warm, _copy(warm), _copy(warm)]))


def test_members_with_and_without_warm_state_each_start_as_alone():
    """A stack of a warm and a cold member, and of DGram states with and without ``dual_smoothing``
    (a state left by Stiefel before ``set_manifold``): before, every member started cold."""
    M, g = DGram(), torch.Generator().manual_seed(2)
    W = torch.stack([M.random((48, 16), generator=g, dtype=F64) for _ in range(2)])
    G0 = _rand(g, 2, 48, 16)
    G1 = G0 + 0.2 * _rand(g, 2, 48, 16)
    warm: dict = {}
    M.dualize(W[0], G0[0], warm)
    _same(*_alone_and_stacked(M, W, G1, [warm, {}]))
    left_by_stiefel: dict = {}
    Stiefel().dualize(W[1], G0[1], left_by_stiefel)
    assert "dual_smoothing" not in left_by_stiefel
    _same(*_alone_and_stacked(M, W, G1, [warm, left_by_stiefel]))
    _same(*_alone_and_stacked(Stiefel(), W, G1, [warm, {}]))


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("name", ["stiefel", "dgram"])
def test_stacked_members_take_the_iterations_they_take_alone(monkeypatch, name, every):
    """Members certified at once, after ~20 and after many iterations: each one's iterations and
    answer are its own, at the CPU's and the accelerator's stopping cadence. Before, a member near
    its tolerance made every member compute its lower bound on every iteration (DGram: 21 instead
    of 22, 14 instead of 16)."""
    monkeypatch.setitem(dual_ascent.CHECK_EVERY, "cpu", every)
    M = Stiefel() if name == "stiefel" else DGram()
    g = torch.Generator().manual_seed(1)
    m, n = 48, 16
    W = torch.stack([M.random((m, n), generator=g, dtype=F64) for _ in range(3)])
    if name == "dgram":
        W = W * torch.logspace(0, -2, n, dtype=F64)[torch.randperm(n, generator=g)]
    G = torch.stack([_rand(g, m, n), _spike(g, m, n), W[2] @ (0.1 * _rand(g, n, n)) + 1e-3 * _rand(g, m, n)])
    _same(*_alone_and_stacked(M, W, G, [{}, {}, {}]))


def test_batched_dualize_answers_each_member_as_alone():
    """A direct DGram().dualize on a (2, 3, 6, 6) batch: every member's answer is the one it gets
    alone, and the reported iterations are the worst member's."""
    M, g = DGram(), torch.Generator().manual_seed(3)
    W = M.random((2, 3, 6, 6), generator=g, dtype=F64)
    G = torch.randn(2, 3, 6, 6, generator=g, dtype=F64)
    st: dict = {}
    A = M.dualize(W, G, st)
    iters = []
    for i in range(2):
        for j in range(3):
            sj: dict = {}
            assert float((M.dualize(W[i, j], G[i, j], sj) - A[i, j]).abs().max()) <= 1e-12
            iters.append(sj["iterations"])
    assert st["iterations"] == max(iters) and st["certificate"].shape == (2, 3, 6, 6)
