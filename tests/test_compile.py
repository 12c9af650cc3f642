"""torch.compile and the optimizer: ``torch.compile(opt.step)`` works with the default backend and
gives the eager step's numbers (the step runs eagerly by design, see DualizeRetract.step)."""
from __future__ import annotations

import torch

from modula_mhc import compounds
from modula_mhc.optim import DualizeRetract


def _run(compiled: bool):
    torch.manual_seed(0)
    model = compounds.GPT(13, 8, 16, 1, 2)
    opt = DualizeRetract(model, lr=0.1)
    step = torch.compile(opt.step) if compiled else opt.step
    x = torch.randint(0, 13, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(x).square().mean().backward()
        step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_compiled_opt_step_equals_eager_step():
    torch._dynamo.reset()
    for a, b in zip(_run(True), _run(False)):
        assert torch.equal(a, b)
