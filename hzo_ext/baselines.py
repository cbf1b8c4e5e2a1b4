"""Baselines with the HZO interface (constructor, then ``backward(x, y) -> loss``, ``last_stats``).

- ``CGE``: DeepZero-style neuron-wise zeroth order: perturb each a_l coordinate-wise and run
  to the loss (costs M*L*(L-1) queries for uniform width M), then the same leaf VJPs as HZO.
- ``SPSA``: MeZO-style seeded Gaussian directions on all parameters (unbiased, high variance).
- ``Backprop``: ordinary autograd.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from . import distributed
from .estimator import EstimateStats, StageEstimator, outside_inference_mode, probe_targets
from .stages import LossHead, as_stages, check_batch, check_eps, check_stages_static, run_stage

__all__ = ["CGE", "SPSA", "Backprop"]


def _forward(stages, x: torch.Tensor) -> torch.Tensor:
    for l in range(1, len(stages) + 1):
        x = run_stage(stages, l, x)
    return x


class CGE(StageEstimator):
    """Coordinate-wise gradient estimation on activations (DeepZero-style): for every stage
    l < L, probe each coordinate of a_l through f_L o ... o f_{l+1} and the loss. Options as HZO."""

    @outside_inference_mode
    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self._prepare(x, y)
        acts, local = self._clean_forward(x)
        L, B = len(self.stages), x.shape[0]
        self._check_steps(acts, range(1, L + 1))
        loss = self.loss.check_reproduces(acts[-1], y)
        qstages = self._query_stages()
        with torch.no_grad():
            deltas = {L: self._loss_head(acts[L], y)}
            to_loss = self._per_sample_loss(y, B)
            for l in range(1, L):
                a, eps = self._qcast(acts[l]), self._step(acts[l])
                run = lambda z, n, l=l: to_loss(self._run_range(qstages, z, l, L), n)  # noqa: E731
                ones = torch.ones(B, 1, dtype=a.dtype, device=a.device)
                deltas[l] = probe_targets(run, a, ones, eps, self.chunk_size, shard=self._shard, what=f"a_{l}")
                self._check_probe(deltas[l], qstages, a, l, L, eps, f"while probing a_{l} to the loss (CGE)")
                K = a[0].numel() if self._shard is None else self._shard.count(a[0].numel())  # this rank's
                self.last_stats.fd_layer_evals += 2 * K * (L - l)
                self.last_stats.probes += K
        self._leaves(acts, local, deltas)
        self.last_stats.seconds = time.perf_counter() - t0
        return loss.detach()


class SPSA:
    """MeZO-style SPSA: g = mean_s (L(w + eps z_s) - L(w - eps z_s)) / (2 eps) * z_s, z_s ~ N(0, I)
    over all trainable parameters. Directions come from ``seed`` and the call count, so two
    estimators built with the same seed give the same sequence of estimates."""

    def __init__(self, model, loss_fn, eps: float = 1e-3, num_samples: int = 1, seed: int = 0, process_group=None):
        self.stages = as_stages(model)
        self.loss = LossHead(loss_fn)
        self.eps = check_eps(eps)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.num_samples, self.seed, self.calls = num_samples, seed, 0
        self.params = list({id(p): p for s in self.stages for p in s.parameters() if p.requires_grad}.values())
        self.last_stats = EstimateStats()
        distributed.attach(self, process_group)  # data-parallel: same directions, shard losses combined

    @torch.no_grad()
    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        check_batch(x, y, self.stages)
        check_stages_static(self.stages)
        L = len(self.stages)
        stats = self.last_stats = EstimateStats()
        loss = self.loss.total(_forward(self.stages, x), y)
        gen = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        saved = [p.detach().clone() for p in self.params]
        grads = [torch.zeros_like(p) for p in self.params]
        for _ in range(self.num_samples):
            z = [torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for p in self.params]
            side = []
            for sign in (1.0, -1.0):
                for p, w, d in zip(self.params, saved, z):
                    p.copy_(w + sign * self.eps * d)
                side.append(self.loss.total(_forward(self.stages, x), y))
            for p, w in zip(self.params, saved):
                p.copy_(w)
            proj = (side[0] - side[1]) / (2 * self.eps)
            if not torch.isfinite(proj):
                raise ValueError("non-finite value in an SPSA query (perturbed loss is inf/nan); lower eps")
            for g, d in zip(grads, z):
                g.add_(d, alpha=proj.item() / self.num_samples)
        for p, g in zip(self.params, grads):
            p.grad = g if p.grad is None else p.grad + g
        stats.fd_layer_evals = 2 * self.num_samples * L
        stats.probes = self.num_samples
        stats.forward_calls = (2 * self.num_samples + 1) * L
        stats.loss_evals = 2 * self.num_samples
        stats.seconds = time.perf_counter() - t0
        return loss.detach()


class Backprop:
    """Ordinary autograd through the whole chain, with the estimators' interface."""

    def __init__(self, model, loss_fn, process_group=None):
        self.model = model
        self.stages = as_stages(model)
        self.loss = LossHead(loss_fn)
        self.last_stats = EstimateStats()
        distributed.attach(self, process_group)  # data-parallel, like DDP

    @outside_inference_mode
    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        check_batch(x, y, self.stages)
        own = isinstance(self.model, nn.Module) and not isinstance(self.model, nn.ModuleList)
        out = self.model(x) if own else _forward(self.stages, x)  # the model's own forward
        loss = self.loss.total(out, y)
        loss.backward()
        self.last_stats = EstimateStats(forward_calls=len(self.stages), seconds=time.perf_counter() - t0)
        return loss.detach()
