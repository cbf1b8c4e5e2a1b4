"""Gradient-accuracy metrics: per-stage cosine against a reference, computed scale-free."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch

from .stages import as_stages

__all__ = ["per_layer_cosine", "scale_free_cosine", "grads_of", "reference_grads", "named_grads",
           "reference_named_grads", "per_parameter_cosine"]


def scale_free_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) with each vector normalised first (by its max-abs, then its norm), so tiny but
    exact gradients are not read as 0 (``F.cosine_similarity`` clamps the norm product at 1e-8).
    Two zero vectors read 1, one zero vector 0."""
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    na, nb = a.abs().max() if a.numel() else a.new_zeros(()), b.abs().max() if b.numel() else b.new_zeros(())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    a, b = a / na, b / nb
    return float((a / a.norm()) @ (b / b.norm()))


def grads_of(model) -> dict[str, torch.Tensor | None]:
    """{parameter name: clone of p.grad} for an nn.Sequential or list model (names 'l.name')."""
    return {f"{l}.{n}": (None if p.grad is None else p.grad.detach().clone())
            for l, stage in enumerate(as_stages(model)) for n, p in stage.named_parameters()}


def per_layer_cosine(model, grads_a: Mapping | Sequence, grads_b: Mapping | Sequence) -> list[float]:
    """Cosine per stage (stages with trainable parameters), each stage's gradients flattened
    together. grads_* are ``grads_of(model)`` dicts or lists aligned with the model's
    ``(stage, named_parameters)`` order. The acceptance figure is ``min(...)``."""
    stages = as_stages(model)
    names = [f"{l}.{n}" for l, stage in enumerate(stages) for n, _ in stage.named_parameters()]
    ga = grads_a if isinstance(grads_a, Mapping) else dict(zip(names, grads_a))
    gb = grads_b if isinstance(grads_b, Mapping) else dict(zip(names, grads_b))
    out = []
    for l, stage in enumerate(stages):
        params = [(f"{l}.{n}", p) for n, p in stage.named_parameters() if p.requires_grad]
        if not params:
            continue

        def flat(g):
            return torch.cat([(g[k] if g.get(k) is not None else torch.zeros_like(p)).detach().double().reshape(-1)
                              for k, p in params])
        out.append(scale_free_cosine(flat(ga), flat(gb)))
    return out


def reference_grads(model, loss_fn, x: torch.Tensor, y: torch.Tensor, dtype=torch.float64) -> dict:
    """Autograd gradients of a copy of the model in ``dtype`` (float64 by default): the reference."""
    from .stages import LossHead
    ref = copy.deepcopy(model)
    stages = as_stages(ref)
    for s in stages:
        s.to(dtype).zero_grad(set_to_none=True)
    a = x.to(dtype) if x.is_floating_point() else x
    for s in stages:
        a = s(a)
    LossHead(copy.deepcopy(loss_fn).to(dtype) if isinstance(loss_fn, torch.nn.Module) else loss_fn).total(a, y).backward()
    return grads_of(ref)


# ---- any model: by parameter name --------------------------------------------------------------

def named_grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """{name in model.named_parameters(): clone of p.grad} (a shared parameter once)."""
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def reference_named_grads(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                          dtype=torch.float64) -> dict:
    """Autograd gradients of a copy of the model in ``dtype``, run as its own forward, by name."""
    from .stages import LossHead
    ref = copy.deepcopy(model).to(dtype)
    ref.zero_grad(set_to_none=True)
    loss = copy.deepcopy(loss_fn).to(dtype) if isinstance(loss_fn, torch.nn.Module) else loss_fn
    LossHead(loss).total(ref(x.to(dtype) if x.is_floating_point() else x), y).backward()  # ids stay ids
    return named_grads(ref)


def per_parameter_cosine(grads_a: Mapping, grads_b: Mapping) -> dict[str, float]:
    """Scale-free cosine per parameter tensor of two ``named_grads`` dicts (None reads as zeros)."""
    out = {}
    for k, a in grads_a.items():
        b = grads_b.get(k)
        if a is None and b is None:
            continue
        zeros = torch.zeros((a if a is not None else b).shape)
        out[k] = scale_free_cosine(zeros if a is None else a, zeros if b is None else b)
    return out
