"""Scale-out with torch.distributed: data-parallel and query-parallel estimates.

Two modes, chosen by the estimator's constructor (``attach`` below wires them in):

- **data-parallel** (``process_group=pg``): every rank estimates on its own shard of the
  batch, then one all_reduce combines the gradients, weighted by each shard's share of the
  loss's normaliser (1/B of a mean-reduced loss, the class weights of a weighted
  CrossEntropy, 1 for 'sum'), so unequal shards give the whole batch's gradient, and the
  returned loss is the whole batch's. HZO, CGE, SPSA and Backprop all support it.
- **query-parallel** (``process_group=pg, query_parallel=True``, HZO and CGE): every rank
  holds the same batch; the probes of every split (and of the loss head) are cut into one
  contiguous block of probe ids per rank, and the partial targets are summed with one
  all_reduce per split. A probe writes only its own input coordinates (dense: one; SPP: the
  coordinates of its color), so the blocks' partial targets have disjoint supports and the
  sum adds exact zeros: the targets equal the single-process ones to round-off. Leaves are
  cheap and every rank computes them all, so every rank ends with the full gradient.

Before every estimate the ranks all_gather a small fingerprint (estimator and its settings,
input dtype/shapes, batch size, parameter names/shapes/dtypes, a checksum of the weights; in
query-parallel mode also a checksum of the batch) and raise the same ValueError on every
rank naming what differs; a rank whose own input check failed reports it there too, so a bad
input on one rank never leaves the others blocked in a collective. Every wait has a timeout
(``TIMEOUT``, env ``HZO_DIST_TIMEOUT`` in seconds, default 600) that raises a TimeoutError
naming the collective. Collectives run on the CPU for gloo and on the input's device for NCCL.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import time
import types
from datetime import timedelta

import torch
import torch.distributed as dist

from .stages import check_batch

__all__ = ["attach", "Shard", "broadcast_parameters", "block", "init_from_env", "TIMEOUT"]

TIMEOUT = timedelta(seconds=float(os.environ.get("HZO_DIST_TIMEOUT", "600")))
_CHECKSUM_RTOL = 1e-9  # weights/batches identical up to the summation order of the checksum itself


# ---- wiring --------------------------------------------------------------------------------

def attach(est, process_group, query_parallel: bool = False, can_query_parallel: bool = False) -> None:
    """Set ``est.process_group``, ``est.query_parallel`` and ``est._shard``, and wrap
    ``est.backward`` with the cross-rank check and the mode's reduction (no-op without a group)."""
    if not isinstance(query_parallel, bool):
        raise TypeError(f"query_parallel must be a bool, got {query_parallel!r}")
    est.process_group, est.query_parallel, est._shard = process_group, query_parallel, None
    if process_group is None:
        if query_parallel:
            raise ValueError("query_parallel=True needs a process_group (torch.distributed) to shard the probes over")
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first (e.g. under torchrun)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD), got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("this process is not a member of process_group")
    if query_parallel and not can_query_parallel:
        raise ValueError(f"{type(est).__name__} has no query-parallel mode (HZO and CGE have); use "
                         f"query_parallel=False for data-parallel")
    if query_parallel:
        est._shard = Shard(est, process_group)
    # the instance's backward wraps the class's (the single-process estimate on this rank)
    est.backward = types.MethodType(_query_parallel_backward if query_parallel else _data_parallel_backward, est)


def broadcast_parameters(model: torch.nn.Module, process_group=None, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (e.g. after a per-rank random init)."""
    for t in list(model.parameters()) + list(model.buffers()):
        dev = _comm_device(process_group, t.device)
        buf = t.detach().to(dev)
        _wait(dist.broadcast(buf, src=dist.get_global_rank(process_group or dist.group.WORLD, src),
                             group=process_group, async_op=True), "broadcast_parameters")
        with torch.no_grad():
            t.copy_(buf)


def block(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous block [lo, hi) of n items (probes, or the samples of a batch)."""
    return rank * n // world, (rank + 1) * n // world


def init_from_env(device: str) -> tuple:
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment): join
    the default group, gloo on the CPU or NCCL with one GPU per local rank. Returns (group,
    rank, world size, this rank's device)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError("distributed training needs torchrun (WORLD_SIZE and RANK are not set), e.g. "
                         "torchrun --nproc_per_node 2 -m hzo_ext train --distributed dp")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size(), device


# ---- collectives with a timeout -------------------------------------------------------------

def _wait(work, what: str) -> None:
    try:
        work.wait(timeout=TIMEOUT)
    except RuntimeError as exc:
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        raise TimeoutError(f"hzo_ext.distributed: waited {TIMEOUT.total_seconds():.0f} s in {what} for the other "
                           f"ranks (one may have failed, be at another step, or be much slower); set "
                           f"HZO_DIST_TIMEOUT (seconds) to wait longer") from exc


def _comm_device(group, device: torch.device) -> torch.device:
    """NCCL needs CUDA tensors; gloo (and the rest) get CPU tensors."""
    if device.type == "cuda" and "nccl" in str(dist.get_backend(group)).lower():
        return device
    return torch.device("cpu")


def _all_gather_objects(obj, group, device: torch.device, what: str) -> list:
    """all_gather_object with timeouts: lengths first, then the padded pickles."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    world = dist.get_world_size(group)
    n = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    _wait(dist.all_gather(sizes, n, group=group, async_op=True), what)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    parts = [torch.empty_like(padded) for _ in range(world)]
    _wait(dist.all_gather(parts, padded, group=group, async_op=True), what)
    return [pickle.loads(p[:int(s.item())].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]


# ---- query-parallel: this rank's probes ---------------------------------------------------------

class Shard:
    """This rank's block of the probes of every split, and the sum of the partial targets."""

    def __init__(self, est, group):
        self.est, self.group = est, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def probes(self, num_probes: int) -> tuple[int, int]:
        """[lo, hi): contiguous, sizes within one of each other, empty when ranks > probes."""
        return block(num_probes, self.rank, self.world)

    def count(self, num_probes: int) -> int:
        lo, hi = self.probes(num_probes)
        return hi - lo

    def sum(self, part: torch.Tensor | None, like: torch.Tensor, num_inputs: int, what: str) -> torch.Tensor:
        """The full targets [B, num_inputs] from this rank's partial ones (None: it had no probes).
        The partial supports are disjoint, so the sum is exact."""
        t0 = time.perf_counter()
        if part is None:
            part = torch.zeros(like.shape[0], num_inputs, dtype=like.dtype, device=like.device)
        buf = part.to(_comm_device(self.group, part.device))
        _wait(dist.all_reduce(buf, group=self.group, async_op=True), f"the sum of the partial targets of {what}")
        self.est.last_stats.comm_seconds += time.perf_counter() - t0
        return buf.to(part.device)


def _query_parallel_backward(est, x, y):
    t0 = time.perf_counter()
    _check_ranks(est, x, y, data_parallel=False)
    t_check = time.perf_counter() - t0
    loss = type(est).backward(est, x, y)  # probe_targets sums the partial targets through est._shard
    est.last_stats.check_seconds = t_check
    est.last_stats.seconds = time.perf_counter() - t0
    return loss


# ---- data-parallel ------------------------------------------------------------------------------

def _trainable(est) -> list[torch.nn.Parameter]:
    return list({id(p): p for s in est.stages for p in s.parameters() if p.requires_grad}.values())


def shard_weight(loss_head, y: torch.Tensor) -> float:
    """This shard's part of the loss's normaliser, up to a factor common to all ranks: the
    denominator of a mean-type reduction (B, or the sum of the targets' class weights for a
    weighted/ignore_index CrossEntropy/NLL), or 0 for 'sum' (the gradients simply add)."""
    if loss_head.reduced is not None and loss_head.reduction == "sum":
        return 0.0
    # LossHead's scale is 1/numel of the unreduced loss: a stand-in with one entry per sample
    # gives the denominator up to the per-sample entry count, the same on every rank.
    stand_in = torch.ones(y.shape[0], dtype=torch.float64, device=y.device)
    scale = float(loss_head._scale(stand_in, y))
    return 1.0 / scale if scale > 0 else 0.0


def _data_parallel_backward(est, x, y):
    t0 = time.perf_counter()
    weights = _check_ranks(est, x, y, data_parallel=True)
    t_check = time.perf_counter() - t0
    total = sum(weights)
    # this rank's share: w_r / sum_r w_r (mean-type reductions) or 1 ('sum': every w_r is 0)
    share = weights[dist.get_rank(est.process_group)] / total if total > 0 else 1.0
    params = _trainable(est)
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    failure, loss = None, None
    try:
        loss = type(est).backward(est, x, y)
    except Exception as exc:  # noqa: BLE001 (re-raised below, once the other ranks know)
        failure = exc
    local = [p.grad for p in params]
    t1 = time.perf_counter()
    dtype = _common_dtype(params)
    device = _comm_device(est.process_group, x.device)
    # one buffer: share * gradient per parameter | whether this rank has one | share * loss | failed
    pieces = [(g.detach().to(dtype) * share if g is not None else torch.zeros(p.numel(), dtype=dtype, device=p.device))
              .reshape(-1).to(device) for p, g in zip(params, local)]
    extras = [float(g is not None) for g in local] + [share * float(loss) if loss is not None else 0.0,
                                                      float(failure is not None)]
    buf = torch.cat(pieces + [torch.tensor(extras, dtype=dtype, device=device)])
    _wait(dist.all_reduce(buf, group=est.process_group, async_op=True), "the gradient all_reduce (data-parallel)")
    t_comm = time.perf_counter() - t1
    if failure is not None or buf[-1].item() > 0:
        for p, old in zip(params, saved):
            p.grad = old
        if failure is not None:
            raise failure
        raise RuntimeError(f"hzo_ext.distributed: {int(buf[-1].item())} other rank(s) failed during their "
                           f"estimate (data-parallel); see their error")
    offset, present = 0, buf[-(len(params) + 2):-2].tolist()
    for p, old, here in zip(params, saved, present):
        g = buf[offset:offset + p.numel()].view(p.shape).to(device=p.device, dtype=p.dtype)
        offset += p.numel()
        if here:  # some rank produced a gradient (autograd leaves p.grad None otherwise)
            p.grad = g if old is None else old + g
        else:
            p.grad = old
    est.last_stats.check_seconds = t_check
    est.last_stats.comm_seconds += t_comm
    est.last_stats.seconds = time.perf_counter() - t0
    return torch.tensor(buf[-2].item(), dtype=loss.dtype, device=loss.device)  # the whole batch's loss


def _common_dtype(params) -> torch.dtype:
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


# ---- the cross-rank check -----------------------------------------------------------------------

def _settings(est) -> dict:
    """The estimator's options that every rank must share."""
    keys = ("eps", "eps_mode", "split", "spp", "chunk_size", "query_dtype", "num_samples", "seed", "check_samples",
            "mode")  # mode: SPSA's blocks setting
    out = {"estimator": type(est).__name__}
    for k in keys:
        if hasattr(est, k):
            v = getattr(est, k)
            out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else (
                getattr(v, "__name__", None) or repr(v) if callable(v) else str(v))
    out["loss"] = (type(est.loss.reduced or est.loss.unreduced).__name__, est.loss.reduction)
    if hasattr(est, "calls"):
        out["calls"] = est.calls  # SPSA: same directions on every rank
    return out


@torch.no_grad()
def _fingerprint(est, x, y, data_parallel: bool) -> dict:
    fp = {"mode": "data-parallel" if data_parallel else "query-parallel",
          "world": dist.get_world_size(est.process_group), "settings": _settings(est), "error": None}
    try:
        check_batch(x, y, est.stages)
        if x.shape[0] == 0:
            raise ValueError("empty batch: every rank needs at least one sample")
    except (TypeError, ValueError) as exc:
        fp["error"] = (type(exc).__name__, str(exc))
    fp["input"] = (str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__,
                   tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None,
                   str(y.dtype) if isinstance(y, torch.Tensor) else None,
                   tuple(y.shape[1:]) if isinstance(y, torch.Tensor) else None)
    fp["batch"] = x.shape[0] if isinstance(x, torch.Tensor) else None
    fp["params"] = [(f"stage {l}.{n}", tuple(p.shape), str(p.dtype), p.requires_grad)
                    for l, s in enumerate(est.stages, start=1) for n, p in s.named_parameters()]
    fp["weights"] = _checksum([p for s in est.stages for p in s.parameters()])
    if data_parallel:
        fp["weight"] = shard_weight(est.loss, y) if fp["error"] is None else 0.0
    elif fp["error"] is None:
        fp["data"] = _checksum([x, y])
    return fp


def _checksum(tensors) -> tuple[float, float]:
    s, a = 0.0, 0.0
    for t in tensors:
        t = t.detach().double()
        s += float(t.sum())
        a += float(t.abs().sum())
    return s, a


def _close(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return abs(a[0] - b[0]) <= _CHECKSUM_RTOL * (a[1] + b[1]) + 1e-300 and \
        abs(a[1] - b[1]) <= _CHECKSUM_RTOL * (a[1] + b[1]) + 1e-300


_WHAT = {"mode": "the mode (data-parallel / query-parallel)", "world": "the group size",
         "settings": "the estimator or its settings", "input": "the input dtype / per-sample shapes (x, y)",
         "batch": "the batch size", "params": "the model (parameter names, shapes, dtypes)",
         "weights": "the model's weights (checksum)", "data": "the batch's contents (checksum)"}
_HINT = {"batch": "query_parallel needs the same batch on every rank",
         "weights": "start every rank from the same weights (hzo_ext.distributed.broadcast_parameters) and "
                    "apply the same optimizer steps",
         "data": "query_parallel needs the same (x, y) on every rank",
         "params": "every rank must build the same model"}


def _describe(key: str, values: list) -> str:
    if key == "settings":  # only the options that differ
        names = [k for k in values[0] if any(v.get(k) != values[0][k] for v in values)] or list(values[0])
        return "; ".join(f"{k}: " + ", ".join(f"rank {r}: {v.get(k)!r}" for r, v in enumerate(values)) for k in names)
    if key == "params":
        ref = values[0]
        for r, v in enumerate(values[1:], start=1):
            if v != ref:
                diff = next((f"{a} vs {b}" for a, b in zip(ref, v) if a != b),
                            f"{len(ref)} vs {len(v)} parameters")
                return f"rank 0 vs rank {r}: {diff}"
    if key in ("weights", "data"):
        return ", ".join(f"rank {r}: sum {v[0]:.17g}" for r, v in enumerate(values))
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))


def _summary(fp: dict, data_parallel: bool) -> list[float]:
    """The fingerprint as 14 float64 numbers: a sha256 of what must be equal (8 exact 32-bit
    words), the error flag, this rank's loss weight, the weight and batch checksums."""
    same = [fp[k] for k in ("mode", "world", "settings", "input", "params")] + ([] if data_parallel else [fp["batch"]])
    digest = hashlib.sha256(repr(same).encode()).digest()
    words = [float(int.from_bytes(digest[i:i + 4], "little")) for i in range(0, 32, 4)]
    return words + [float(fp["error"] is not None), fp.get("weight", 0.0), *fp["weights"], *fp.get("data", (0.0, 0.0))]


def _check_ranks(est, x, y, data_parallel: bool) -> list[float]:
    """Raise the same error on every rank if any rank's input failed its check or the ranks
    disagree; returns every rank's loss weight (data-parallel). One all_gather of 14 numbers
    when all is well; the full fingerprints are gathered only to name what differs."""
    device = _comm_device(est.process_group, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
    mine = _fingerprint(est, x, y, data_parallel)
    summary = torch.tensor(_summary(mine, data_parallel), dtype=torch.float64, device=device)
    parts = [torch.empty_like(summary) for _ in range(dist.get_world_size(est.process_group))]
    _wait(dist.all_gather(parts, summary, group=est.process_group, async_op=True), "the cross-rank check of the inputs")
    rows = [p.tolist() for p in parts]
    if all(r[:8] == rows[0][:8] and r[8] == 0 and _close(r[10:12], rows[0][10:12]) and _close(r[12:14], rows[0][12:14])
           for r in rows):
        return [r[9] for r in rows]
    infos = _all_gather_objects(mine, est.process_group, device, "the cross-rank check of the inputs")
    errors = [(r, i["error"]) for r, i in enumerate(infos) if i["error"] is not None]
    if errors:
        kind = {"TypeError": TypeError}.get(errors[0][1][0], ValueError)
        raise kind("; ".join(f"rank {r}: {msg}" for r, (_, msg) in errors))
    keys = ["mode", "world", "settings", "input", "params", "weights"] + ([] if data_parallel else ["batch", "data"])
    problems, differ = [], set()
    for key in keys:
        values = [i[key] for i in infos]
        same = all(_close(v, values[0]) for v in values) if key in ("weights", "data") else \
            all(v == values[0] for v in values)
        implied = (key == "weights" and "params" in differ) or (key == "data" and differ & {"batch", "input"})
        if not same and not implied:
            hint = f" ({_HINT[key]})" if key in _HINT else ""
            problems.append(f"ranks disagree on {_WHAT[key]}: {_describe(key, values)}{hint}")
            differ.add(key)
    if problems:
        mode = "query_parallel=True" if not data_parallel else "data-parallel"
        raise ValueError(f"{type(est).__name__}(process_group=..., {mode}): " + "; ".join(problems))
    raise ValueError(f"{type(est).__name__}(process_group=...): the ranks' fingerprints differ")  # not reached
