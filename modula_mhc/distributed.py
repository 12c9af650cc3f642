"""Data-parallel and sharded training with the dualize-then-retract optimizer.

msign and the manifold steps act on whole matrices, so a data-parallel optimizer cannot update a
row shard on its own. :class:`DistributedDualizeRetract` spreads the *matrices* over the ranks
instead (as distributed Muon implementations do): every parameter has one owner rank, the owner
alone keeps its momentum and dual-ascent state (a sharded optimizer state) and computes its update
on the full matrix, and the new weights are sent back so every rank ends the step with identical
(replicated) or correctly sharded weights. No rank does all the work: the owners are assigned
round-robin over the parameters sorted by size.

Two layouts of the parameters are supported, detected per parameter:

* replicated (``torch.nn.parallel.DistributedDataParallel``, or any code that averages gradients
  over ranks): gradients are already averaged; each owner updates its matrices in place and
  broadcasts them (one flat broadcast per rank and step).
* sharded (FSDP2 ``torch.distributed.fsdp.fully_shard``, or DTensor parameters with a ``Shard(0)``
  or ``Replicate`` placement on a 1-D mesh): each owner gathers the row shards of weight and
  (averaged) gradient, updates the full matrix, and scatters the new rows back.

Non-finite gradients: all ranks agree (one all-reduce of a flag) before any state changes, then
follow ``nonfinite="skip"`` (default: skip the step, warn, count it in ``skipped_steps``) or
``"raise"`` (``FloatingPointError``); a skipped step leaves weights and momentum untouched.

Every collective runs on tensors on the parameters' device (CUDA tensors under NCCL, CPU under
gloo); how long a collective may wait for a stuck rank is the process group's ``timeout``
(``init_process_group(timeout=...)``; the torchrun example's ``--dist-timeout``).

Without an initialised process group the optimizer is :class:`~modula_mhc.optim.DualizeRetract`
plus the non-finite policy (world size 1). See docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from .module import Module
from .optim import NONFINITE_POLICIES, DualizeRetract

__all__ = ["DistributedDualizeRetract", "assign_owners", "unwrap", "NONFINITE_POLICIES"]


def unwrap(model):
    """The modula_mhc Module inside a DistributedDataParallel wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def assign_owners(shapes, world_size: int) -> list:
    """Owner rank of each parameter: round-robin over the parameters sorted by size (largest
    first, ties by position), so every rank gets a near-equal share of the msign work.
    Deterministic in the shapes alone, hence identical on every rank."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"assign_owners: world_size must be a positive int, got {world_size!r}")
    sizes = [math.prod(s) for s in shapes]
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    owners = [0] * len(sizes)
    for position, i in enumerate(order):
        owners[i] = position % world_size
    return owners


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # very old torch
        return False
    return isinstance(t, DTensor)


def _row_layout(p, world: int):
    """(is_sharded, rows per padded chunk, rows on each rank) of a parameter's dim-0 layout.
    FSDP2 and DTensor's Shard(0) split dim 0 like torch.chunk: ceil(n/world) rows per rank."""
    if not _is_dtensor(p):
        return False, None, None
    from torch.distributed.tensor import Replicate, Shard
    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1:
        raise NotImplementedError(f"DistributedDualizeRetract: DTensor parameters on a {p.device_mesh.ndim}-D mesh "
                                  f"(placements {placements}) are not supported; use a 1-D mesh")
    if isinstance(placements[0], Replicate):
        return False, None, None
    if not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise NotImplementedError(f"DistributedDualizeRetract: placement {placements[0]} is not supported; "
                                  "parameters must be sharded on dim 0 (FSDP2's default) or replicated")
    if p.device_mesh.size() != world:
        raise NotImplementedError("DistributedDualizeRetract: the DTensor mesh must span the whole process group")
    n = p.shape[0]
    chunk = -(-n // world)
    rows = [max(0, min(chunk, n - r * chunk)) for r in range(world)]
    return True, chunk, rows


def _local(t):
    """The local tensor of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if _is_dtensor(t) else t


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    pad = t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))
    return torch.cat([t, pad], dim=0)


def _weight_slot(atom):
    """(module, name) of the registered parameter that ``atom.weight`` reads: the atom's own
    ``weight``, or for an adapt view (which registers none) its model module's parameter."""
    if "weight" in atom._parameters:
        return atom, "weight"
    return atom._owner, atom.param_name


class _FullWeight:
    """Temporarily give an atom a full, plain weight so its own dualize/step code (which reads
    ``atom.weight``) runs on the whole matrix; the sharded parameter is put back afterwards."""

    def __init__(self, atom, full: torch.Tensor):
        self.atom, self.full = atom, full

    def __enter__(self):
        # a replicated weight is already whole: nothing to swap (adapt views could not be swapped
        # through the atom: their parameter belongs to the model's module)
        self.swap = self.full is not self.atom.weight
        if self.swap:
            self.module, self.name = _weight_slot(self.atom)
            self.saved = self.module._parameters[self.name]
            self.module._parameters[self.name] = torch.nn.Parameter(self.full, requires_grad=False)
        return self

    def __exit__(self, *exc):
        if self.swap:
            self.module._parameters[self.name] = self.saved
        return False


class DistributedDualizeRetract(DualizeRetract):
    """DistributedDualizeRetract(module, lr=0.25, momentum=0.95, nesterov=True, weight_decay=0.0,
    nonfinite="skip", process_group=None).

    The step of :class:`~modula_mhc.optim.DualizeRetract` — per parameter W of atom a,
    b ← βb + (1−β)g, A = a.dualize_weight(nesterov(b, g), 1/c_a), W ← retract(W − lr·A) — with
    each parameter updated by one owner rank (``owner_of``) and the result broadcast (replicated
    parameters, DDP) or scattered (FSDP2 / DTensor ``Shard(0)``). Build it after wrapping the
    model (``fully_shard`` replaces the parameters); pass the modula_mhc Module (a DDP wrapper is
    unwrapped). Gradients must already be averaged over ranks (DDP and FSDP2 do this).

    ``state_dict()`` holds this rank's share of the state; ``full_state_dict()`` (a collective)
    returns the whole state in :class:`DualizeRetract`'s format, and ``load_state_dict`` accepts
    either and keeps the entries this rank owns.
    """

    def __init__(self, module, lr: float = 0.25, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, nonfinite: str = "skip", process_group=None):
        module = unwrap(module)
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDualizeRetract: expected a modula_mhc Module (or a DDP wrapper of one), "
                            f"got {type(module).__name__}")
        super().__init__(module, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         nonfinite=nonfinite)
        self.group = process_group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(process_group) if self.distributed else 1
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        params = self._all_params()
        devices = {_local(p).device for p in params}
        if len(devices) != 1:
            raise ValueError("DistributedDualizeRetract: all parameters must be on one device, found "
                             f"{sorted(map(str, devices))}")
        #: where the optimizer's own collective tensors live (the parameters' device: NCCL needs CUDA tensors)
        self.device = devices.pop()
        owners = assign_owners([tuple(p.shape) for p in params], self.world)
        self._owner = {id(p): r for p, r in zip(params, owners)}
        self._layout = {id(p): _row_layout(p, self.world) for p in params}

    def add_param_group(self, param_group):
        """DualizeRetract's add_param_group (hyperparameters and duplicates checked first), then an
        owner for each new parameter: ``assign_owners`` over the new group's shapes, identical on
        every rank. The parameters must be on ``opt.device`` (ValueError, nothing added)."""
        registered = hasattr(self, "_owner")  # False while the constructor adds its own group
        if registered and isinstance(param_group, dict) and not isinstance(param_group.get("params"),
                                                                           (torch.Tensor, set, type(None))):
            param_group["params"] = list(param_group["params"])  # a generator is read once
        if registered and isinstance(param_group, dict):
            params = param_group.get("params")
            tensors = [params] if isinstance(params, torch.Tensor) else list(params or ())
            devices = {_local(p).device for p in tensors if isinstance(p, torch.Tensor)} - {self.device}
            if devices:
                raise ValueError("DistributedDualizeRetract: all parameters must be on one device "
                                 f"({self.device}); the new group has {sorted(map(str, devices))}")
        super().add_param_group(param_group)
        if registered:
            new = [p for p in self.param_groups[-1]["params"] if id(p) not in self._owner]
            for p, r in zip(new, assign_owners([tuple(p.shape) for p in new], self.world)):
                self._owner[id(p)], self._layout[id(p)] = r, _row_layout(p, self.world)

    # ------------------------------------------------------------------ queries
    def owner_of(self, p) -> int:
        """Rank that updates parameter ``p`` and keeps its optimizer state."""
        return self._owner[id(p)]

    def owned(self) -> list:
        """Parameters this rank updates."""
        return [p for p in self._all_params() if self._owner[id(p)] == self.rank]

    # ------------------------------------------------------------------ the step
    def _gradients_finite(self) -> bool:
        """True when every rank's gradients (local shards for sharded parameters) are finite."""
        bad = torch.zeros(1, device=self.device)  # NCCL has no CPU tensors: flags live on the parameters' device
        for p in self._all_params():
            if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all()):
                bad.fill_(1.0)
                break
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        return bad.item() == 0

    def _raise_if_any_failed(self, error: BaseException | None) -> None:
        """Re-raise ``error`` (this rank's owner update failed) after every rank has learnt, by one
        all-reduce of a flag, whether any update failed; the others raise RuntimeError. Without it
        they waited in the broadcast or scatter for the failed rank until the process group's
        timeout (30 minutes by default for gloo)."""
        if self.distributed and self.world > 1:
            failed = torch.tensor([float(error is not None)], device=self.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
            if error is None and failed.item() != 0:
                raise RuntimeError("DistributedDualizeRetract: another rank's update failed (its error is in that "
                                   "rank's output); no weights were exchanged in this step")
        if error is not None:
            raise error

    def _update_full(self, p, W, G, group):
        """DualizeRetract's per-parameter step on the full matrix W (updated in place)."""
        with _FullWeight(self._atom(p), W):  # the atom's weight shares W's storage: its in-place step lands in W
            self._update(p, G, group)

    def _step_parameters(self):
        """The distributed step (``step`` itself — closure on every rank, the non-finite check agreed
        across ranks — is DualizeRetract's)."""
        # every rank must agree on which parameters take part (a collective per parameter follows)
        work = [(p, g) for g in self.param_groups for p in g["params"]
                if self._targets[id(p)] != 0.0]
        has_grad = torch.tensor([float(p.grad is not None) for p, _ in work], device=self.device)
        if self.distributed and work:
            # the MIN and the MAX over ranks (as min(h) and −min(−h)), so every rank sees a
            # disagreement and raises: with MIN alone a rank holding the minimum went on into the
            # next collective and waited there for the rank that had raised
            agreed = torch.cat([has_grad, -has_grad])
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)
            if not torch.equal(agreed[: len(work)], -agreed[len(work):]):
                raise RuntimeError("DistributedDualizeRetract: ranks disagree on which parameters have gradients "
                                   "(every rank must run the same forward/backward graph)")
        work = [(p, g) for (p, g), h in zip(work, has_grad.tolist()) if h]
        replicated = [(p, g) for p, g in work if not self._layout[id(p)][0]]
        sharded = [(p, g) for p, g in work if self._layout[id(p)][0]]
        if sharded:
            self._step_sharded(sharded)
        self._step_replicated(replicated)

    def _step_replicated(self, work):
        mine = [(p, group) for p, group in work if self._owner[id(p)] == self.rank]
        error = None
        try:
            with contextlib.ExitStack() as full:  # one batched update of everything this rank owns
                for p, _ in mine:
                    full.enter_context(_FullWeight(self._atom(p), _local(p)))
                self._update_many([(p, _local(p.grad), group) for p, group in mine])
        except Exception as e:  # every rank must hear of it before the broadcasts below
            error = e
        self._raise_if_any_failed(error)
        if not self.distributed or self.world == 1:
            return
        # one flat broadcast per owner rank, in parameter order (identical on every rank)
        for r in range(self.world):
            mine = [_local(p) for p, _ in work if self._owner[id(p)] == r]
            if not mine:
                continue
            flat = torch.cat([t.reshape(-1) for t in mine])
            dist.broadcast(flat, src=dist.get_global_rank(self.group, r) if self.group is not None else r,
                           group=self.group)
            if r != self.rank:
                offset = 0
                for t in mine:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def _global(self, r):
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def _step_sharded(self, work):
        # 1. gather [weight rows; gradient rows] of every parameter on its owner (async, all at once)
        gathered, handles = [], []
        for p, _ in work:
            _, chunk, rows = self._layout[id(p)]
            owner = self._owner[id(p)]
            local = torch.stack([_pad_rows(_local(p).detach(), chunk), _pad_rows(_local(p.grad), chunk)])
            bufs = [torch.empty_like(local) for _ in range(self.world)] if owner == self.rank else None
            handles.append(dist.gather(local, bufs, dst=self._global(owner), group=self.group, async_op=True))
            gathered.append(bufs)
        for h in handles:
            h.wait()
        # 2. owners update their full matrices
        new_rows: list = []
        error = None
        try:
            for (p, group), bufs in zip(work, gathered):
                _, chunk, rows = self._layout[id(p)]
                if bufs is None:
                    new_rows.append(None)
                    continue
                W = torch.cat([b[0][:n] for b, n in zip(bufs, rows)])
                G = torch.cat([b[1][:n] for b, n in zip(bufs, rows)])
                self._update_full(p, W, G, group)
                new_rows.append([_pad_rows(W[r * chunk: r * chunk + n], chunk) for r, n in enumerate(rows)])
        except Exception as e:  # every rank must hear of it before the scatters below
            error = e
        self._raise_if_any_failed(error)
        # 3. scatter the new rows back to every rank's shard
        handles, outs = [], []
        for (p, _), chunks in zip(work, new_rows):
            _, chunk, rows = self._layout[id(p)]
            out = torch.empty((chunk,) + tuple(p.shape[1:]), dtype=p.dtype, device=_local(p).device)
            handles.append(dist.scatter(out, chunks, src=self._global(self._owner[id(p)]), group=self.group,
                                        async_op=True))
            outs.append(out)
        for h in handles:
            h.wait()
        for (p, _), out in zip(work, outs):
            local = _local(p)
            local.copy_(out[:local.shape[0]])

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """This rank's share of the state (the parameters it owns), marked ``rank_share`` = {rank,
        world_size} when there are several ranks: ``load_state_dict`` refuses a share anywhere else."""
        sd = super().state_dict()
        if self.world > 1:
            sd["rank_share"] = {"rank": self.rank, "world_size": self.world}
        return sd

    def full_state_dict(self):
        """The whole optimizer state on every rank (a collective): each owner contributes the
        state of its parameters. Loadable by DualizeRetract and by this class at any world size."""
        sd = self.state_dict()
        sd.pop("rank_share", None)
        if not self.distributed or self.world == 1:
            return sd
        pieces = [None] * self.world
        dist.all_gather_object(pieces, sd["state"], group=self.group)
        merged = {}
        for piece in pieces:
            merged.update(piece)
        sd["state"] = dict(sorted(merged.items()))
        return sd

    def load_state_dict(self, state_dict):
        """Load a full state dict (``full_state_dict()``, DualizeRetract's) or this rank's own share
        (``state_dict()`` at the same rank and world size); entries another rank owns are dropped.
        ValueError for another rank's share: the state of what this rank owns would be missing and
        its momentum would restart from zero without a word."""
        share = state_dict.get("rank_share") if isinstance(state_dict, dict) else None
        if share is not None:
            if (share.get("rank"), share.get("world_size")) != (self.rank, self.world):
                raise ValueError(f"DistributedDualizeRetract.load_state_dict: this is rank {share.get('rank')}'s share "
                                 f"of a {share.get('world_size')}-process optimizer (state_dict()), loaded on rank "
                                 f"{self.rank} of {self.world}: it lacks the state of the parameters this rank owns. "
                                 "Save full_state_dict() to move a checkpoint between ranks or world sizes")
            state_dict = {k: v for k, v in state_dict.items() if k != "rank_share"}
        super().load_state_dict(state_dict)
        for p in self._all_params():
            if self._owner[id(p)] != self.rank:
                self.state.pop(p, None)
