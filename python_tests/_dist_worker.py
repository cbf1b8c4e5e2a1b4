"""One rank of the distributed tests: ``python _dist_worker.py RANK WORLD PORT OUT``.

Joins a gloo group on 127.0.0.1:PORT, runs every scenario of ``scenarios(rank)`` in order
(all ranks run the same sequence) and saves, per scenario, the gradients, loss and stats, or
the error it raised, to OUT/rank<RANK>.pt. test_distributed.py compares them with
single-process estimates.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import hzo_ext
import hzo_ext.distributed
from hzo_ext.models import deep_mlp, digits_cnn

B = 10  # the whole batch; data-parallel ranks take slices of it


def data(n=B, din=6, dout=5, seed=1, image=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) if image else \
        torch.randn(n, din, generator=g, dtype=torch.float64)
    return x, torch.randint(0, dout, (n,), generator=g)


def cnn():
    torch.manual_seed(0)
    return digits_cnn(width=3).double()


WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)

# name -> (model, estimator factory (model, loss, group) -> est, loss, slice of the whole batch per rank or None
# (query-parallel: every rank the whole batch), image input)
SCENARIOS = {
    "dp_hzo_plain": (lambda: deep_mlp(6, 12, "gelu"), lambda m, l, g: hzo_ext.HZO(m, l, process_group=g, split="bisect"),
                     nn.CrossEntropyLoss, [slice(0, 5), slice(5, 10)], False),
    "dp_hzo_residual_unequal": (lambda: deep_mlp(8, 12, "gelu", residual=True),
                                lambda m, l, g: hzo_ext.HZO(m, l, split="chain", process_group=g),
                                nn.CrossEntropyLoss, [slice(0, 7), slice(7, 10)], False),
    "dp_hzo_weighted_ce": (lambda: deep_mlp(5, 10, "tanh", residual=True),
                           lambda m, l, g: hzo_ext.HZO(m, l, process_group=g, split="bisect"),
                           lambda: nn.CrossEntropyLoss(weight=WEIGHTS), [slice(0, 3), slice(3, 10)], False),
    "dp_hzo_auto": (lambda: deep_mlp(6, 12, "gelu", residual=True), lambda m, l, g: hzo_ext.HZO(m, l, process_group=g),
                    nn.CrossEntropyLoss, [slice(0, 4), slice(4, 10)], False),
    "dp_hzo_sum": (lambda: deep_mlp(4, 10, "gelu"), lambda m, l, g: hzo_ext.HZO(m, l, process_group=g, split="bisect"),
                   lambda: nn.CrossEntropyLoss(reduction="sum"), [slice(0, 6), slice(6, 10)], False),
    "dp_cge": (lambda: deep_mlp(4, 8, "gelu", residual=True), lambda m, l, g: hzo_ext.CGE(m, l, process_group=g),
               nn.CrossEntropyLoss, [slice(0, 4), slice(4, 10)], False),
    "dp_spsa": (lambda: deep_mlp(4, 8, "gelu", residual=True),
                lambda m, l, g: hzo_ext.SPSA(m, l, num_samples=3, seed=5, process_group=g),
                nn.CrossEntropyLoss, [slice(0, 5), slice(5, 10)], False),
    "dp_backprop": (lambda: deep_mlp(6, 12, "gelu", residual=True),
                    lambda m, l, g: hzo_ext.Backprop(m, l, process_group=g),
                    nn.CrossEntropyLoss, [slice(0, 6), slice(6, 10)], False),
    "qp_hzo_dense": (lambda: deep_mlp(9, 12, "gelu", residual=True),
                     lambda m, l, g: hzo_ext.HZO(m, l, process_group=g, query_parallel=g is not None, split="bisect"),
                     nn.CrossEntropyLoss, None, False),
    "qp_hzo_plain_chunked": (lambda: deep_mlp(6, 11, "tanh"),
                             lambda m, l, g: hzo_ext.HZO(m, l, chunk_size=4, eps_mode="relative",
                                                         process_group=g, query_parallel=g is not None, split="bisect"),
                             nn.CrossEntropyLoss, None, False),
    "qp_hzo_spp_cnn": (cnn, lambda m, l, g: hzo_ext.HZO(m, l, chunk_size=5, process_group=g, query_parallel=g is not None, split="bisect"),
                       nn.CrossEntropyLoss, None, True),
    "qp_cge": (lambda: deep_mlp(4, 8, "gelu", residual=True),
               lambda m, l, g: hzo_ext.CGE(m, l, process_group=g, query_parallel=g is not None),
               nn.CrossEntropyLoss, None, False),
}


def single_process(name):
    """The reference: the scenario's estimator without a group, on the whole batch."""
    make_model, make_est, make_loss, _, image = SCENARIOS[name]
    model = make_model()
    x, y = data(image=image)
    est = make_est(model, make_loss(), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = est.backward(x, y)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss, est.last_stats


def run_scenario(name, rank, group):
    make_model, make_est, make_loss, slices, image = SCENARIOS[name]
    model = make_model()
    x, y = data(image=image)
    if slices is not None:
        x, y = x[slices[rank]], y[slices[rank]]
    est = make_est(model, make_loss(), group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = est.backward(x, y)
    return dict(grads={n: p.grad.clone() for n, p in model.named_parameters()}, loss=loss, stats=est.last_stats)


def accumulate(rank, group):
    """p.grad accumulates, like autograd: twice the same estimate gives twice the gradient."""
    model = deep_mlp(3, 8, "gelu", residual=True)
    x, y = data()
    est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), process_group=group, split="bisect")
    for _ in range(2):
        est.backward(x[rank * 5:(rank + 1) * 5], y[rank * 5:(rank + 1) * 5])
    return dict(grads={n: p.grad.clone() for n, p in model.named_parameters()})


def broadcast(rank, group):
    """broadcast_parameters: rank 0's weights on every rank, then the ranks pass the check."""
    model = deep_mlp(3, 8, "gelu", seed=rank)
    hzo_ext.distributed.broadcast_parameters(model, group)
    x, y = data()
    hzo_ext.HZO(model, nn.CrossEntropyLoss(), process_group=group, query_parallel=True, split="bisect").backward(x, y)
    return dict(weights={n: p.detach().clone() for n, p in model.named_parameters()})


def bad(kind, rank, group):
    """Scenarios that must raise on every rank."""
    x, y = data()
    if kind == "qp_batch_size":
        model, (x, y) = deep_mlp(3, 8, "gelu"), data(n=B if rank == 0 else 8)
        est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), process_group=group, query_parallel=True, split="bisect")
    elif kind == "qp_batch_contents":
        model, (x, y) = deep_mlp(3, 8, "gelu"), data(seed=1 + rank)
        est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), process_group=group, query_parallel=True, split="bisect")
    elif kind == "dp_model_shapes":
        model = deep_mlp(3, 8 if rank == 0 else 9, "gelu")
        est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), process_group=group, split="bisect")
    elif kind == "dp_model_depth":
        model = deep_mlp(3 + rank, 8, "gelu")
        est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), process_group=group, split="bisect")
    elif kind == "qp_model_weights":
        model = deep_mlp(3, 8, "gelu", seed=rank)
        est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), process_group=group, query_parallel=True, split="bisect")
    elif kind == "dp_settings":
        model = deep_mlp(3, 8, "gelu")
        est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), eps=1e-3 * (1 + rank), process_group=group, split="bisect")
    elif kind == "dp_bad_input_one_rank":
        model = deep_mlp(3, 8, "gelu")
        est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), process_group=group, split="bisect")
        if rank == 1:
            x = x.float()
    elif kind == "dp_failure_inside_estimate":
        model = deep_mlp(3, 8, "gelu")
        est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), process_group=group, split="bisect")
        if rank == 1:
            x = x.clone()
            x[0, 0] = 1e308  # finite (inf is refused before the estimate), too large for eps=1e-3 inside it
    else:
        raise AssertionError(kind)
    try:
        est.backward(x, y)
    except Exception as exc:  # noqa: BLE001
        return dict(error=f"{type(exc).__name__}: {exc}")
    return dict(error=None)


BAD = ("qp_batch_size", "qp_batch_contents", "dp_model_shapes", "dp_model_depth", "qp_model_weights",
       "dp_settings", "dp_bad_input_one_rank", "dp_failure_inside_estimate")


def main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    hzo_ext.distributed.TIMEOUT = timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    group = dist.group.WORLD
    results = {}
    for name in SCENARIOS:
        results[name] = run_scenario(name, rank, group)
    results["accumulate"] = accumulate(rank, group)
    results["broadcast"] = broadcast(rank, group)
    for kind in BAD:
        results[kind] = bad(kind, rank, group)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    # Last, as it leaves a collective pending: rank 1 never calls backward, rank 0 must time out.
    done = os.path.join(out, "timeout.txt")
    if rank == 0:
        hzo_ext.distributed.TIMEOUT = timedelta(seconds=2)
        est = hzo_ext.HZO(deep_mlp(3, 8, "gelu"), nn.CrossEntropyLoss(), process_group=group, split="bisect")
        try:
            est.backward(*data())
            message = "no error"
        except Exception as exc:  # noqa: BLE001
            message = f"{type(exc).__name__}: {exc}"
        with open(done + ".tmp", "w") as f:
            f.write(message)
        os.replace(done + ".tmp", done)
    else:
        deadline = time.time() + 120
        while not os.path.exists(done) and time.time() < deadline:
            time.sleep(0.05)
    os._exit(0)  # no destroy_process_group: rank 0's all_gather will never complete


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
