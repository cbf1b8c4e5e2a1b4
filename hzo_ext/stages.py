"""Model normalisation for the estimators: stages, their validation, and the per-sample loss.

A model is a chain of *stages* ``a_l = f_l(a_{l-1})``: the elements of an ``nn.Sequential``
or of a list, or the pieces of any other module's torch.fx graph between the points where one
tensor is live (``hzo_ext.graph``). ``ResidualBlock`` makes a skip connection one stage;
``BlackBox`` marks a non-differentiable stage (its weights get a zeroth-order leaf).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from .registry import coupling

__all__ = ["ResidualBlock", "BlackBox", "as_stages", "stage_name", "check_stages_static",
           "check_stages_dynamic", "run_stage", "LossHead", "check_eps"]


class ResidualBlock(nn.Module):
    """``x + module(x)``, or ``shortcut(x) + module(x)`` (e.g. a strided 1x1 conv where the
    branch changes the shape): a residual block, skip included, is one stage."""

    def __init__(self, module: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.module = module
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.shortcut is None else self.shortcut(x)) + self.module(x)


class BlackBox(nn.Module):
    """Marks a non-differentiable stage (quantised, noisy or simulated hardware).

    The estimators never run autograd through it: its inputs' targets come from the usual
    finite-difference splits, and its own parameters get central finite differences
    contracted with the stage's target. ``eps`` (default: the estimator's) is the step on
    its parameters; pick it larger than the stage's quantisation step.
    """

    def __init__(self, module: nn.Module, eps: float | None = None):
        super().__init__()
        if eps is not None:
            check_eps(eps, "BlackBox eps")
        self.module = module
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def check_eps(eps, what: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {eps!r}")
    return float(eps)


def as_stages(model) -> list[nn.Module]:
    """The stages of ``model``: an ``nn.Sequential``'s elements (a module used twice is two
    stages), a list/tuple of modules, or the pieces of any other module's traced graph."""
    from .graph import Stages, stages_of
    if isinstance(model, nn.Sequential):
        stages = Stages(model)  # iterating keeps a module that appears twice; children() would not
    elif isinstance(model, (list, tuple, nn.ModuleList)):
        stages = Stages(model)
    elif isinstance(model, nn.Module):
        stages = stages_of(model)
    else:
        raise TypeError(f"model must be an nn.Module (traced with torch.fx), an nn.Sequential or a list of "
                        f"modules, got {type(model).__name__}")
    if not stages:
        raise ValueError("model has no stages")
    for l, s in enumerate(stages, start=1):
        if not isinstance(s, nn.Module):
            raise TypeError(f"stage {l} is a {type(s).__name__}, not an nn.Module")
    return stages


def stage_name(stages: Sequence[nn.Module], l: int) -> str:
    """Human-readable name of stage l (1-based, as in a_l = f_l(a_{l-1})): its type, and its name
    in a traced model."""
    names = getattr(stages, "names", None)
    where = f"{names[l - 1]}: " if names and names[l - 1] else ""
    return f"stage {l} ({where}{type(stages[l - 1]).__name__})"


def check_stages_static(stages: Sequence[nn.Module]) -> None:
    """Refuse modules set to break the method (``registry.coupling``), naming stage and submodule."""
    for l, stage in enumerate(stages, start=1):
        for name, mod in stage.named_modules():
            why = coupling(mod)
            if why is not None:
                raise ValueError(f"{stage_name(stages, l)}{', submodule ' + repr(name) if name else ''}: {why}")


def run_stage(stages: Sequence[nn.Module], l: int, a: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """Apply stage l to a, turning failures and non-tensor outputs into errors that name it."""
    stage = stages[l - 1] if module is None else module
    try:
        out = stage(a)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"{stage_name(stages, l)} failed on an input of shape {tuple(a.shape)} "
                         f"and dtype {a.dtype}: {exc}") from exc
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{stage_name(stages, l)} returned a {type(out).__name__}; every stage must "
                        f"return one tensor [B, ...] (split tuple outputs into separate stages)")
    if out.dim() < 2 or out.shape[0] != a.shape[0]:
        raise ValueError(f"{stage_name(stages, l)} maps a batch of {a.shape[0]} to shape "
                         f"{tuple(out.shape)}; stages must keep the batch dimension first and "
                         f"have at least one feature dimension")
    return out


def coupling_tolerance(dtype: torch.dtype) -> float:
    """Relative change of clean rows that counts as coupling (above batched round-off)."""
    return max(1e-5, 10 * torch.finfo(dtype).eps)


def stacked_variants(a: torch.Tensor):
    """(stacked, rows): the batch a stacked with far-away rows b, as the probes stack copies,
    and where a's rows are. b: a copy moved up and one moved down by a shift that differs per
    coordinate (a uniform shift is invisible to softmax-like ops), and zeros (integer ids: the
    ids mirrored in the batch's range, its lowest and its highest); each after the batch and
    before it. Any dependence of a row's output on the other rows or on its position
    (batch statistics, a mean or median over the batch, a weight per row index) shows in a's
    rows, whatever the batch size, one included."""
    n, B = a[0].numel(), a.shape[0]
    if a.is_floating_point():
        ramp = torch.linspace(1.0, 2.0, n, dtype=a.dtype, device=a.device).reshape(a.shape[1:])
        shift = 2.0 * (a.abs().max() + 1.0) * ramp
        others = (a + shift, a - shift, torch.zeros_like(a))
    else:  # integer ids: other ids of the batch's range (beyond it an Embedding has no row)
        lo, hi = a.min(), a.max()
        others = (lo + hi - a, torch.full_like(a, lo), torch.full_like(a, hi))
    for b in others:
        yield torch.cat([a, b]), slice(0, B)
        yield torch.cat([b, a]), slice(B, 2 * B)


def changed_rows(again: torch.Tensor, out: torch.Tensor) -> bool:
    same = again == out  # equal values, infinities (a -inf mask) included
    if bool(same.all()):
        return False
    finite = out[torch.isfinite(out)]
    scale = (finite.abs().max().item() if finite.numel() else 0.0) + 1e-30
    diff = (again - out).masked_fill(same, 0).abs().max().item()
    return not diff <= coupling_tolerance(out.dtype) * scale  # nan counts as changed


@torch.no_grad()
def check_stages_dynamic(stages: Sequence[nn.Module], acts: Sequence[torch.Tensor], only=None) -> None:
    """One-time check on real activations (per input shape, dtype and device): each stage is
    deterministic, and its outputs for the batch are unchanged when far-away copies are stacked
    before or after it (no hidden in-batch mixing or row-index dependence; batch size 1
    included). ``only``: the (1-based) stages to check, default all."""
    for l in range(1, len(stages) + 1) if only is None else sorted(only):
        a, out = acts[l - 1], acts[l]
        again = stages[l - 1](a.clone())  # copies in: in-place ops must not overwrite the activations
        if not torch.equal(again, out) and not torch.allclose(again, out, rtol=1e-6, atol=0):
            raise ValueError(f"{stage_name(stages, l)} is not deterministic: two evaluations of the same "
                             f"input differ, so finite differences through it are noise "
                             f"(fix its seed, call .eval(), or pass training=self.training to "
                             f"functional dropout)")
        if any(changed_rows(stages[l - 1](stacked)[rows], out) for stacked, rows in stacked_variants(a)):
            raise ValueError(f"{stage_name(stages, l)} mixes samples: stacking other samples with the batch "
                             f"changed the batch's outputs (batch statistics, a mean or median over the "
                             f"batch, a dependence on the row index); stages must treat samples independently")


# ---- the loss, evaluated per sample ------------------------------------------------------

_CLASS_INDEX_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


def _call_loss(fn, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    try:
        return fn(z, y)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(f"the loss failed on the model's output of shape {tuple(z.shape)} ({z.dtype}) and y of "
                         f"shape {tuple(y.shape)} ({y.dtype}): {exc}") from exc


class LossHead:
    """The loss as a sum of scaled per-sample terms: ``loss = sum_b per_sample(z, y)[b]``.

    A standard torch loss module is evaluated with ``reduction='none'`` and each sample's
    terms summed; the reduction's scale is reproduced (1 for 'sum'; for 'mean' 1/numel of
    the unreduced loss, or 1/sum of target class weights for CrossEntropy/NLL with weights
    or ignore_index; 1/B for KLDiv 'batchmean'). A plain callable must return per-sample
    losses [B] (or [B, ...]: each sample's terms are summed); the objective is their mean.
    """

    def __init__(self, loss_fn):
        if isinstance(loss_fn, nn.modules.loss._Loss):
            if not hasattr(loss_fn, "reduction"):
                raise TypeError(f"{type(loss_fn).__name__} has no 'reduction' attribute")
            self.reduced = loss_fn
            self.unreduced = copy.copy(loss_fn)
            self.unreduced.reduction = "none"
            self.reduction = loss_fn.reduction
        elif callable(loss_fn):
            self.reduced = None
            self.unreduced = loss_fn
            self.reduction = "per-sample mean"
        else:
            raise TypeError(f"loss_fn must be a torch loss module or a callable returning per-sample "
                            f"losses, got {type(loss_fn).__name__}")
        self._checked = False
        self._coupling_checked: set = set()

    def _scale(self, raw: torch.Tensor, y: torch.Tensor) -> float | torch.Tensor:
        B = raw.shape[0]
        if self.reduced is None or self.reduction == "sum":
            return 1.0 / B if self.reduced is None else 1.0
        if self.reduction == "none":
            raise ValueError(f"{type(self.reduced).__name__}(reduction='none') returns no scalar loss; "
                             f"use 'mean' or 'sum', or pass a callable returning per-sample losses")
        if self.reduction == "batchmean":
            return 1.0 / B
        if self.reduction != "mean":
            raise ValueError(f"unsupported reduction {self.reduction!r}")
        if isinstance(self.reduced, _CLASS_INDEX_LOSSES) and y.dtype in (torch.int64, torch.int32):
            w = self.reduced.weight
            keep = (y != self.reduced.ignore_index)
            wy = keep.to(raw.dtype) if w is None else w.to(raw.dtype)[y.clamp(min=0)] * keep
            return 1.0 / wy.sum()
        return 1.0 / raw.numel()

    def per_sample(self, z: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Scaled per-sample losses [N] for logits z [N, ...] and targets y [N, ...]; the scale
        comes from the first ``batch`` rows (the real batch) when copies are stacked."""
        raw = _call_loss(self.unreduced, z, y)
        if not isinstance(raw, torch.Tensor) or raw.dim() == 0 or raw.shape[0] != z.shape[0]:
            shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ValueError(f"the loss must give one value per sample ([{z.shape[0]}, ...]), got {shape}; "
                             f"pass a torch loss module or a callable returning per-sample losses")
        n = batch or z.shape[0]
        scale = self._scale(raw[:n], y[:n])
        return raw.reshape(raw.shape[0], -1).sum(1) * scale

    @torch.no_grad()
    def check_per_sample(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """A callable loss must give each sample's loss from that sample alone: its values for the
        batch must not change when shifted copies are stacked after it (as the loss head stacks
        its perturbed logits). Once per shape; torch loss modules are per-sample by construction."""
        key = (tuple(z.shape), z.dtype, z.device)
        if self.reduced is not None or key in self._coupling_checked:
            return
        raw, n, ys = self.per_sample(z, y), z.shape[0], torch.cat([y, y])
        for stacked, rows in stacked_variants(z):
            if changed_rows(self.per_sample(stacked, ys, batch=n)[rows], raw):
                raise ValueError("the loss callable mixes samples: stacking other samples with the batch changed "
                                 "the batch's per-sample losses (a mean, median or normalisation over the batch, "
                                 "a dependence on the row index); it must compute each sample's loss from that "
                                 "sample alone")
        self._coupling_checked.add(key)

    def total(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss as the user's loss_fn defines it (0-dim)."""
        if self.reduced is not None:
            return _call_loss(self.reduced, z, y)
        return self.per_sample(z, y).sum()

    def check_shapes(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """The output has a row per sample, and a loss module's target does not broadcast it to
        another shape (output [B, 1] with y [B] gives [B, B]: every output against every target)."""
        if z.dim() < 2:
            raise ValueError(f"the model's output must be [B, *features] (a row per sample), got shape "
                             f"{tuple(z.shape)}; keep a feature dimension (e.g. [B, 1])")
        if self.reduced is None or not y.is_floating_point() or y.shape == z.shape or y.dim() == z.dim():
            return  # the same dims: y [B, 1] against [B, C] broadcasts within each sample
        try:
            shape = torch.broadcast_shapes(z.shape, y.shape)
        except RuntimeError:
            return  # the loss itself names the mismatch
        if shape != z.shape:
            raise ValueError(f"{type(self.reduced).__name__}: y of shape {tuple(y.shape)} broadcasts against the "
                             f"model's output {tuple(z.shape)} to {tuple(shape)}, so the loss compares outputs "
                             f"with other samples' targets; give y the output's shape")

    @torch.no_grad()
    def check_reproduces(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Refuse clearly when sum of per-sample terms does not reproduce the reduced loss."""
        self.check_shapes(z, y)
        total = self.total(z, y)
        if total.dim() == 0 and not torch.isfinite(total):  # (reduction='none' is refused below)
            raise ValueError(f"the loss ({type(self.reduced or self.unreduced).__name__}) is {total.item()} on the "
                             f"model's output: nothing to estimate (every target ignore_index? an overflow?)")
        self.check_per_sample(z, y)
        if self.reduced is not None and not self._checked:
            mine = self.per_sample(z, y).sum()
            # Round-off of the two summation orders scales with the dtype's resolution.
            tol = max(1e-4, 8 * torch.finfo(total.dtype).eps)
            if not torch.allclose(mine.to(total.dtype), total, rtol=tol, atol=tol * 1e-2 * (1 + total.abs().item())):
                raise ValueError(f"cannot reproduce {type(self.reduced).__name__}(reduction={self.reduction!r}) "
                                 f"as a sum of per-sample losses ({mine.item():.6g} vs {total.item():.6g}); "
                                 f"pass a callable returning per-sample losses instead")
            self._checked = True
        return total


INTEGER_IDS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def compute_dtype(x: torch.Tensor, stages: Sequence[nn.Module]) -> torch.dtype:
    """The dtype the model computes in: x's, or for integer ids (an Embedding's input) its first
    floating parameter's (torch's default without one). x itself is never perturbed."""
    if x.is_floating_point():
        return x.dtype
    p = next((p for stage in stages for p in stage.parameters() if p.is_floating_point()), None)
    return torch.get_default_dtype() if p is None else p.dtype


def check_batch(x, y, stages: Sequence[nn.Module]) -> None:
    """Shapes and dtypes the estimators accept: x [B, ...] floating or integer ids, y (unless
    None) with the same B."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, (torch.Tensor, type(None))):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if not (x.is_floating_point() or x.dtype in INTEGER_IDS):
        raise TypeError(f"x must be a floating tensor or integer ids (an Embedding's input), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, ...] with a feature dimension, got shape {tuple(x.shape)}")
    if y is not None and (y.dim() == 0 or y.shape[0] != x.shape[0]):
        raise ValueError(f"y must have the batch size of x ({x.shape[0]}) first, got shape {tuple(y.shape)}")
    bad = x.numel() - int(torch.isfinite(x).sum())
    if bad:
        raise ValueError(f"x has {bad} non-finite values (inf/nan); gradients through them are nan")
    bad = 0 if y is None or not y.is_floating_point() else y.numel() - int(torch.isfinite(y).sum())
    if bad:
        raise ValueError(f"y has {bad} non-finite values (inf/nan); the loss and its gradient would be nan")
    dtype = compute_dtype(x, stages)
    for l, stage in enumerate(stages, start=1):
        for name, p in stage.named_parameters():
            if p.is_floating_point() and p.dtype != dtype:
                have = f"x is {x.dtype}" if x.is_floating_point() else f"the model's first parameter is {dtype}"
                raise TypeError(f"{have} but {stage_name(stages, l)} parameter {name!r} is "
                                f"{p.dtype}; convert the model or the input")
            if p.device != x.device:
                raise ValueError(f"x is on {x.device} but {stage_name(stages, l)} parameter {name!r} "
                                 f"is on {p.device}")
            break

