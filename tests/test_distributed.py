"""DistributedDualizeRetract under DDP and FSDP2 (gloo, CPU, 2 processes): after k steps the
weights equal those of a single-process DualizeRetract run on the concatenated batch, the work and
the optimizer state are spread over the ranks, and non-finite gradients are skipped on every rank.

The models run in float64 so that the comparison measures the algorithm, not the order of float
additions in the all-reduce (float32 results: docs/distributed.md)."""
from __future__ import annotations

import datetime
import os
import socket
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from modula_mhc import compounds
from modula_mhc.distributed import DistributedDualizeRetract, assign_owners
from modula_mhc.optim import DualizeRetract

STEPS = 3
WORLD = 2
BATCH = 4  # global batch; each rank gets BATCH / WORLD sequences
VOCAB, CONTEXT = 11, 8
HYPER = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
TOL = 1e-6


def _model(residual="plain"):
    # Stiefel attention (closed form on these square matrices) and Euclidean MLP: every dualize is a
    # continuous function of the gradient, so summation order changes the weights only at rounding
    # level. (DGram's certified solver stops on a data-dependent test; a 1e-16 difference in the
    # gradient can change its iterate and the weights by ~1e-5, within its certified gap.)
    torch.manual_seed(0)
    kwargs = {} if residual == "plain" else {"streams": 2}
    return compounds.GPT(VOCAB, CONTEXT, width=16, depth=1, heads=2, residual=residual, attn_manifold="stiefel",
                         mlp_manifold="euclidean", **kwargs).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=g) for _ in range(STEPS)]


def _loss(model, seq):
    logits = model(seq[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))


def _reference(residual):
    """Single process, the whole batch, the plain optimizer."""
    model = _model(residual)
    opt = DualizeRetract(model, **HYPER)
    for seq in _batches():
        _loss(model, seq).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCENARIOS = (("ddp", "plain", -1), ("fsdp", "mhc", -1), ("ddp", "plain", 1))  # (wrapper, residual, NaN step)


def _worker(rank, world, port, outdir):
    """One rank, one process group, every scenario in turn: wrap, train STEPS steps on its slice of
    each batch, save full weights and state (one spawn for all: process start-up dominates)."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    # a timeout, so that a rank left waiting in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for kind, residual, nan_step in SCENARIOS:
            _scenario(rank, world, kind, residual, nan_step, outdir)
        _gradient_mismatch(rank, world, outdir)  # last: it leaves the ranks out of step on failure
    finally:
        dist.destroy_process_group()


def _gradient_mismatch(rank, world, outdir):
    """The last rank has no gradient for one parameter: every rank must raise (with a MIN-only
    agreement the other rank went on into the next collective and waited there)."""
    import torch.distributed as dist
    model = _model("plain")
    opt = DistributedDualizeRetract(model, **HYPER)
    seq = next(iter(_batches()))
    per_rank = BATCH // world
    _loss(model, seq[rank * per_rank:(rank + 1) * per_rank]).backward()
    for p in model.parameters():  # the replicated layout's averaging, by hand
        dist.all_reduce(p.grad)
    if rank == world - 1:
        list(model.parameters())[-1].grad = None
    try:
        opt.step()
        outcome = "stepped"
    except RuntimeError as e:
        outcome = str(e)
    torch.save(outcome, os.path.join(outdir, f"mismatch-rank{rank}.pt"))


def _scenario(rank, world, kind, residual, nan_step, outdir):
    model = _model(residual)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
        wrapped = model
    opt = DistributedDualizeRetract(model, **HYPER)
    per_rank = BATCH // world
    for step, seq in enumerate(_batches()):
        _loss(wrapped, seq[rank * per_rank:(rank + 1) * per_rank]).backward()
        if step == nan_step and rank == world - 1:  # one rank sees a NaN: all must skip
            next(model.parameters()).grad.fill_(float("nan"))
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            opt.step()
        opt.zero_grad()
    weights = {}
    for n, p in model.named_parameters():
        weights[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    owned = [i for i, p in enumerate(opt._all_params()) if opt.owner_of(p) == rank]
    local_state = [i for i, p in enumerate(opt._all_params()) if p in opt.state and opt.state[p]]
    full = opt.full_state_dict()
    torch.save({"weights": weights, "owned": owned, "local_state": local_state, "skipped": opt.skipped_steps,
                "full_state_keys": sorted(full["state"])},
               os.path.join(outdir, f"{kind}-{residual}-{nan_step}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """{(wrapper, residual, NaN step): [per-rank results]} of one 2-process gloo spawn."""
    import torch.multiprocessing as mp
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    outdir = tmp_path_factory.mktemp("ranks")
    before = torch.get_num_threads()
    mp.spawn(_worker, args=(WORLD, _free_port(), str(outdir)), nprocs=WORLD)
    torch.set_num_threads(before)
    out = {sc: [torch.load(outdir / f"{sc[0]}-{sc[1]}-{sc[2]}-rank{r}.pt", weights_only=False) for r in range(WORLD)]
           for sc in SCENARIOS}
    out["mismatch"] = [torch.load(outdir / f"mismatch-rank{r}.pt") for r in range(WORLD)]
    return out


pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("kind, residual", [("ddp", "plain"), ("fsdp", "mhc")])
def test_matches_single_process_on_the_concatenated_batch(spawned, kind, residual):
    ranks = spawned[(kind, residual, -1)]
    ref = _reference(residual)
    worst = 0.0
    for r in ranks:
        assert set(r["weights"]) == set(ref)
        for n, w in ref.items():
            diff = (r["weights"][n] - w).abs().max().item()
            worst = max(worst, diff)
            assert diff < TOL, f"rank weights differ from single process at {n}: {diff:.3e}"
    print(f"{kind}/{residual}: max |W_dist - W_single| = {worst:.2e} after {STEPS} steps")
    # the weights moved (the comparison is not between two untouched initialisations)
    init = {n: p.detach() for n, p in _model(residual).named_parameters()}
    assert max((ref[n] - init[n]).abs().max().item() for n in ref) > 1e-3
    # work and state are split: every rank owns some parameters, owners are disjoint and complete,
    # and a rank holds optimizer state only for the parameters it owns
    owned = [set(r["owned"]) for r in ranks]
    assert all(owned) and not owned[0] & owned[1] and owned[0] | owned[1] == set(range(len(ref)))
    for r, mine in zip(ranks, owned):
        assert set(r["local_state"]) <= mine and r["local_state"]
        assert r["full_state_keys"] == sorted(owned[0] | owned[1])


def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(spawned):
    """A NaN on rank 1 at step 1: both ranks skip that step (weights stay finite and identical,
    skipped_steps == 1) — equal to a single-process run of the two other steps."""
    ranks = spawned[("ddp", "plain", 1)]
    model = _model()
    opt = DualizeRetract(model, **HYPER)
    for step, seq in enumerate(_batches()):
        if step == 1:
            continue
        _loss(model, seq).backward()
        opt.step()
        opt.zero_grad()
    for r in ranks:
        assert r["skipped"] == 1
        for n, p in model.named_parameters():
            assert torch.isfinite(r["weights"][n]).all()
            assert (r["weights"][n] - p.detach()).abs().max().item() < TOL, n


# ------------------------------------------------------------------------------ single process

def test_ranks_that_disagree_on_gradients_all_raise(spawned):
    """docs/distributed.md: every rank must produce gradients for the same parameters, "checked; a
    clear error otherwise" — on every rank, so that none is left waiting in a collective."""
    for outcome in spawned["mismatch"]:
        assert "ranks disagree on which parameters have gradients" in outcome


def test_assign_owners_is_balanced_and_deterministic():
    shapes = [(64, 16), (16,), (16, 64), (16, 16), (4, 4), (11, 16)]
    owners = assign_owners(shapes, 2)
    assert owners == assign_owners(shapes, 2)
    assert sorted(set(owners)) == [0, 1]
    # the two largest matrices go to different ranks
    assert owners[0] != owners[2]
    assert assign_owners(shapes, 1) == [0] * len(shapes)
    with pytest.raises(ValueError, match="world_size"):
        assign_owners(shapes, 0)


def test_without_process_group_equals_dualize_retract_bitwise():
    """World size 1: the same numbers as the plain optimizer (guards the copy of its step)."""
    a, b = _model("mhc"), _model("mhc")
    opt_a, opt_b = DualizeRetract(a, **HYPER), DistributedDualizeRetract(b, **HYPER)
    for seq in _batches():
        for m, o in ((a, opt_a), (b, opt_b)):
            _loss(m, seq).backward()
            o.step()
            o.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    # the state round-trips through the plain optimizer's format
    sd = opt_b.full_state_dict()
    opt_a.load_state_dict({k: v for k, v in sd.items() if k != "skipped_steps"})


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="nonfinite"):
        DistributedDualizeRetract(_model(), nonfinite="sometimes")
    with pytest.raises(TypeError, match="modula_mhc Module"):
        DistributedDualizeRetract(torch.nn.Linear(3, 3))


@pytest.mark.slow  # `make test-slow`: a long run (issue 15: fast default tier)
def test_torchrun_example_runs(tmp_path):
    """examples/torchrun_train.sh: 2 processes, 4 steps, writes a checkpoint with the full state."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    r = subprocess.run([os.path.join(repo, "examples", "torchrun_train.sh"), "--steps", "4", "--eval-every", "4",
                        "--manifolds", "muon", "--batch", "4", "--dist-timeout", "120", "--out", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 4:" in r.stdout and "2 ranks, DDP" in r.stdout
    from modula_mhc.train import load_checkpoint
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])  # momentum of every matrix, gathered


def test_torchrun_example_dist_timeout_option():
    """--dist-timeout bounds how long a rank waits for a stuck one (gloo's default is 30 minutes)."""
    import importlib.util
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("torchrun_train", os.path.join(repo, "examples", "torchrun_train.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.parse(["--dist-timeout", "45"]).dist_timeout == 45.0
    assert example.parse([]).dist_timeout == 600.0
    for bad in ("0", "-1", "nan", "abc"):
        with pytest.raises(SystemExit):
            example.parse(["--dist-timeout", bad])


def test_collectives_use_tensors_on_the_parameters_device(monkeypatch):
    """NCCL has no CPU tensors: the optimizer's own flags must live on the parameters' device. Here
    the device is faked as "meta" and the collective records what it was given."""
    import torch.distributed as dist
    model = _model()
    opt = DistributedDualizeRetract(model, **HYPER)
    assert opt.device == next(model.parameters()).device
    _loss(model, _batches()[0]).backward()
    seen = []

    class Seen(Exception):
        pass

    def all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise Seen

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    opt.distributed, opt.device = True, torch.device("meta")
    with pytest.raises(Seen):
        opt._gradients_finite()
    with pytest.raises(Seen):
        opt._step_parameters()
    assert seen == [torch.device("meta")] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_nccl_step_on_cuda_matches_the_plain_optimizer():
    """One process, NCCL, DDP on a GPU: DistributedDualizeRetract's collectives run on CUDA tensors
    and the step equals DualizeRetract's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        model, ref = _model().cuda(), _model().cuda()
        opt, ref_opt = DistributedDualizeRetract(model, **HYPER), DualizeRetract(ref, **HYPER)
        wrapped = DistributedDataParallel(model, device_ids=[0])
        assert opt.distributed and opt.device.type == "cuda"
        for seq in _batches():
            _loss(wrapped, seq.cuda()).backward()
            _loss(ref, seq.cuda()).backward()
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert (p - q).abs().max().item() < 1e-9
    finally:
        dist.destroy_process_group()
