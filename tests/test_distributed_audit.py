"""Audit of DistributedDualizeRetract's boundary (docs/distributed.md): adapted plain-torch models,
param groups added after construction, and per-rank state dicts moved to another rank or world
size. One 2-process gloo spawn (DDP and FSDP2) plus single-process checks; float64 throughout."""
from __future__ import annotations

import datetime
import io
import os
import socket
import sys

import pytest
import torch
import torch.nn.functional as F

import modula_mhc as mm
from modula_mhc import atoms, compounds
from modula_mhc.distributed import DistributedDualizeRetract
from modula_mhc.optim import DualizeRetract

WORLD, BATCH, VOCAB, CONTEXT, STEPS = 2, 4, 11, 6, 3
HYPER = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
TOL = 1e-6  # docs/distributed.md: asserted agreement with one process on the whole batch


class Tiny(torch.nn.Module):
    """A plain-torch model for ``mm.adapt``: embedding, pre-norm MLP block, head."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = torch.nn.Embedding(VOCAB, 8), torch.nn.LayerNorm(8)
        self.fc, self.proj, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(8, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        return self.head(h + self.proj(torch.relu(self.fc(self.ln(h)))))


def _tiny():
    torch.manual_seed(0)
    return Tiny().double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=g) for _ in range(STEPS)]


def _loss(model, seq):
    return F.cross_entropy(model(seq[:, :-1]).reshape(-1, VOCAB), seq[:, 1:].reshape(-1))


def _train(model, opt, wrapped=None, rank=0, world=1):
    per = BATCH // world
    for seq in _batches():
        _loss(wrapped or model, seq[rank * per:(rank + 1) * per]).backward()
        opt.step()
        opt.zero_grad()


def _full(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _adapted_run(rank, world, kind):
    """adapt(model) trained under DDP or FSDP2 (adapt after fully_shard: the views read the DTensors)."""
    model = _tiny()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        wrapped = fully_shard(model)
    opt = DistributedDualizeRetract(mm.adapt(model), **HYPER)
    _train(model, opt, wrapped, rank, world)
    return _full(model)


def _gpt():
    torch.manual_seed(0)
    return compounds.GPT(VOCAB, CONTEXT, width=8, depth=1, heads=2).double()


def _share_moved(rank, world):
    """Rank 0's state_dict() (its share only) loaded on every rank: what each rank reports."""
    model = _gpt()
    opt = DistributedDualizeRetract(model, **HYPER)
    _train(model, opt)  # identical on every rank (the whole batch, no averaging needed)
    share = [opt.state_dict()]
    import torch.distributed as dist
    dist.broadcast_object_list(share, src=0)
    fresh = DistributedDualizeRetract(_gpt(), **HYPER)
    try:
        fresh.load_state_dict(share[0])
        return "loaded"
    except ValueError as e:
        return str(e)


def _owner_fails(rank, world, kind):
    """Rank 1's owner update raises (DDP: replicated weights, broadcast after; FSDP2: sharded,
    scattered after): what each rank raises. Before, rank 0 waited in the broadcast or scatter for
    rank 1 until the process group's timeout."""
    model = _tiny()
    if kind == "fail-fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    opt = DistributedDualizeRetract(mm.adapt(model), **HYPER)
    if rank == 1:
        def fail(*args, **kwargs):
            raise ValueError("this owner's update failed")
        opt._update_many = opt._update_full = fail
    _loss(model, _batches()[0][rank::world]).backward()
    try:
        opt.step()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "stepped"


def _worker(rank, world, port, outdir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out = {}
    try:
        for key, run in (("ddp", _adapted_run), ("fsdp", _adapted_run), ("share", _share_moved),
                         ("fail-ddp", _owner_fails), ("fail-fsdp", _owner_fails)):
            try:
                out[key] = run(rank, world) if run is _share_moved else run(rank, world, key)
            except Exception as e:  # reported by the test (every rank raises alike here: no collective waits)
                out[key] = f"{type(e).__name__}: {e}"
    finally:
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Per-rank results of one 2-process gloo spawn."""
    import torch.multiprocessing as mp
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    outdir = tmp_path_factory.mktemp("audit")
    before = torch.get_num_threads()
    mp.spawn(_worker, args=(WORLD, _free_port(), str(outdir)), nprocs=WORLD)
    torch.set_num_threads(before)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]


def _single_adapted():
    model = _tiny()
    _train(model, DualizeRetract(mm.adapt(model), **HYPER))
    return _full(model)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_adapted_model_matches_single_process(spawned, kind):
    """adapt(plain torch model) under DDP / FSDP2 equals DualizeRetract on the whole batch (the
    views borrow the model's parameters: the optimizer raised KeyError 'weight' swapping them)."""
    ref = _single_adapted()
    init = _full(_tiny())
    assert max((ref[n] - init[n]).abs().max().item() for n in ref) > 1e-3  # the weights moved
    for r in spawned:
        assert isinstance(r[kind], dict), r[kind]
        worst = max((r[kind][n] - ref[n]).abs().max().item() for n in ref)
        assert worst < TOL, f"{kind}: max |W_dist - W_single| = {worst:.2e}"


def test_adapted_model_without_process_group_equals_dualize_retract_bitwise():
    a, b = _tiny(), _tiny()
    _train(a, DualizeRetract(mm.adapt(a), **HYPER))
    _train(b, DistributedDualizeRetract(mm.adapt(b), **HYPER))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_a_rank_share_loaded_on_another_rank_is_refused(spawned):
    """state_dict() is this rank's share: loaded on rank 1 it held none of rank 1's momentum, and
    rank 1 went on silently from zero momentum. Rank 0 (its own share) loads; rank 1 refuses."""
    assert spawned[0]["share"] == "loaded"
    assert "rank 0's share" in spawned[1]["share"] and "full_state_dict()" in spawned[1]["share"]


def test_a_rank_share_loaded_at_another_world_size_is_refused():
    """A share saved at world size 2 and loaded by one process (world size 1): refused, since the
    parameters owned by the other rank would restart from zero momentum."""
    model = _gpt()
    opt = DistributedDualizeRetract(model, **HYPER)
    _train(model, opt)
    share = opt.state_dict()
    share["rank_share"] = {"rank": 0, "world_size": 2}  # what rank 0 of 2 writes (marker checked above)
    with pytest.raises(ValueError, match="rank 0's share of a 2-process"):
        DistributedDualizeRetract(_gpt(), **HYPER).load_state_dict(share)
    with pytest.raises(ValueError, match="one rank's share"):  # nor into the plain optimizer
        DualizeRetract(_gpt(), **HYPER).load_state_dict(share)
    # the full state moves: loaded into the plain optimizer, the next step is the same
    buffer = io.BytesIO()  # through a file, as a checkpoint (in memory the loaded state aliases opt's)
    torch.save(opt.full_state_dict(), buffer)
    buffer.seek(0)
    full = torch.load(buffer)
    assert "rank_share" not in full
    twin = _gpt()
    twin.load_state_dict(model.state_dict())
    plain = DualizeRetract(twin, **HYPER)
    plain.load_state_dict(full)
    for m, o in ((model, opt), (twin, plain)):
        _loss(m, _batches()[0]).backward()
        o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


def test_param_group_added_after_construction_is_stepped():
    """add_param_group: as in DualizeRetract (checked, then stepped with its own lr); the new
    parameter gets an owner (it had none: KeyError at the next step)."""
    torch.manual_seed(0)
    a, b = atoms.Linear(4, 3).double(), atoms.Linear(3, 2).double()
    a2, b2 = atoms.Linear(4, 3).double(), atoms.Linear(3, 2).double()
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    opts = []
    for cls, (p, q) in ((DualizeRetract, (a, b)), (DistributedDualizeRetract, (a2, b2))):
        opt = cls(p, **HYPER)
        opt.add_param_group({"params": [q.weight], "lr": 0.02})
        q(p(x)).square().mean().backward()
        opt.step()
        opts.append(opt)
    assert opts[1].owner_of(b2.weight) == 0 and any(p is b2.weight for p in opts[1].owned())
    assert torch.equal(a.weight, a2.weight) and torch.equal(b.weight, b2.weight)
    with pytest.raises(ValueError, match="lr must be"):
        opts[1].add_param_group({"params": [atoms.Linear(2, 2).weight], "lr": float("nan")})
    with pytest.raises(ValueError, match="on one device"):
        opts[1].add_param_group({"params": [atoms.Linear(2, 2).to("meta").weight]})
    assert len(opts[1].param_groups) == 2  # nothing added by the refused groups


@pytest.mark.parametrize("kind", ["fail-ddp", "fail-fsdp"])
def test_an_owner_update_failing_on_one_rank_fails_every_rank(spawned, kind):
    """The failing rank raises its own error, the others a RuntimeError naming the cause, all in the
    same step: no rank waits in the broadcast/scatter for the failed one (the spawn's process group
    has a 60 s timeout, so a regression fails there instead of passing)."""
    assert spawned[1][kind] == "ValueError: this owner's update failed", spawned[1][kind]
    assert spawned[0][kind].startswith("RuntimeError: DistributedDualizeRetract: another rank's update failed"), \
        spawned[0][kind]
