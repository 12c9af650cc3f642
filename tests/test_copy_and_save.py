"""Whole-model torch.save / pickle / deepcopy work, and the optimizer accepts a copy's parameters (issue 14)."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from modula_mhc import compounds, optim


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_model_round_trips_and_its_copy_trains(how):
    torch.manual_seed(0)
    model = compounds.GPT(16, 8, 16, 1, 2, residual="mhc", streams=2)
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q) and p is not q
    opt = optim.DualizeRetract(twin.parameters(), lr=0.05)   # refused before: the copy had no atom tags
    x = torch.randint(0, 16, (2, 8))
    F.cross_entropy(twin(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert changed, "the copy trains"
    # the copy's weights belong to the copy's atoms, the original's to the original's
    for p in twin.parameters():
        owner = p._mm_atom()
        assert owner is not None and owner.weight is p
    optim.DualizeRetract(model.parameters())
