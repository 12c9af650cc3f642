"""Manifold inputs are checked where they enter (the public dualize/retract/step), not on every
optimizer step: atoms and the optimizer call the unchecked bodies on weights validated once."""
from __future__ import annotations

import pytest
import torch

from modula_mhc import compounds, manifolds
from modula_mhc.manifolds import base
from modula_mhc.optim import DualizeRetract


@pytest.mark.parametrize("name", ["euclidean", "stiefel", "dgram", "oblique", "sphere", "birkhoff"])
def test_public_methods_check_their_inputs(name):
    m = manifolds.get(name)
    W = m.random((6, 6))
    with pytest.raises(ValueError, match=f"{type(m).__name__}.dualize"):
        m.dualize(W, torch.randn(6, 5))
    with pytest.raises(TypeError, match="dualize"):
        m.dualize(W, W.numpy())
    with pytest.raises(TypeError, match="floating"):
        m.retract(torch.ones(6, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="step"):
        m.step(W, torch.randn(5, 6), 0.1)
    if name not in ("euclidean", "sphere"):  # the matrix manifolds refuse vectors
        with pytest.raises(ValueError, match="retract"):
            m.retract(torch.randn(6))
    if name == "birkhoff":
        with pytest.raises(ValueError, match="square"):
            m.retract(torch.rand(4, 6))


def test_optimizer_step_runs_no_input_checks(monkeypatch):
    calls = []

    def counted(f):
        def wrapper(*args, **kwargs):
            calls.append(f.__name__)
            return f(*args, **kwargs)
        return wrapper
    torch.manual_seed(0)
    models = [compounds.GPT(11, 8, 16, 1, 2, attn_manifold="stiefel", mlp_manifold="dgram"),
              compounds.GPT(11, 8, 16, 1, 2, residual="mhc", streams=2)]
    opts = [DualizeRetract(m, lr=0.1) for m in models]
    x = torch.randint(0, 11, (2, 8))
    for m in models:
        m(x).square().mean().backward()
    monkeypatch.setattr(base, "check_tensor", counted(base.check_tensor))
    monkeypatch.setattr(base, "check_same_shape", counted(base.check_same_shape))
    for o in opts:
        o.step()
    assert calls == []
    # the public entry still checks (and is what the counter sees)
    manifolds.get("euclidean").dualize(torch.zeros(3, 3), torch.randn(3, 3))
    assert calls


def test_subclasses_write_plain_maths_and_may_call_super():
    class Doubled(manifolds.Euclidean):
        def dualize(self, W, G, state=None):
            return super().dualize(W, G, state)

    class Underscored(manifolds.Euclidean):
        def _retract(self, Y):
            return Y * 2

    W = torch.zeros(4, 4)
    G = torch.randn(4, 4)
    assert torch.allclose(Doubled().dualize(W, G), manifolds.Euclidean().dualize(W, G))
    assert torch.equal(Underscored().retract(G), G * 2)
    with pytest.raises(ValueError, match="Underscored.retract"):
        Underscored().retract(torch.tensor(1.0))


def test_adapted_embedding_dual_is_scale_free():
    """An adapted nn.Embedding's dual does not vanish for 1e-30 or 1e30 gradients."""
    import modula_mhc as mm
    net = mm.adapt(torch.nn.Sequential(torch.nn.Embedding(10, 6)))
    view = net.atoms()[0]
    G = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    A1 = view.dualize_weight(G)
    for scale in (1e-30, 1e30):
        assert torch.allclose(view.dualize_weight(G * scale), A1, atol=1e-5)
