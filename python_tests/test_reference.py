"""The plain reference (hzo_ext.reference), the oracle of the engines: exact where finite
differences are exact, close to autograd elsewhere, and every engine equal to it to round-off
on the models of the suite."""
import pytest
import torch
from torch import nn

import hzo_ext
from hzo_ext import reference
from hzo_ext.models import deep_mlp, digits_cnn, resnet20_cifar

from _models import batch


def _max_rel(grads: dict, ref: dict) -> float:
    assert grads.keys() == ref.keys()
    return max(((g - ref[p]).abs().max() / ref[p].abs().max()).item() for p, g in grads.items())


def _autograd(model, loss_fn, x, y) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    return dict(zip(params, torch.autograd.grad(loss_fn(model(x), y), params)))


class AffineNet(nn.Module):
    """Affine in x and in each parameter, with a skip connection: central differences are exact."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        h = self.conv(x)
        h = self.pool(h + x[:, :1])
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("cuts", ["ops", "stages"])
@pytest.mark.parametrize("split", ["bisect", "chain"])
def test_reference_is_exact_on_an_affine_model(cuts, split):
    torch.manual_seed(0)
    model = AffineNet().double()
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    loss = nn.MSELoss(reduction="sum")  # quadratic: the loss head's central difference is exact too
    stages = reference.op_stages(model) if cuts == "ops" else reference.module_stages(model)
    assert len(stages) >= 4
    got = reference.grads(stages, loss, x, y, eps=1e-3, split=split)
    assert _max_rel(got, _autograd(model, loss, x, y)) <= 1e-9


def test_reference_follows_autograd_to_second_order_in_eps():
    model = deep_mlp(4, 6, act="tanh")
    x, y = batch()
    ref = _autograd(model, nn.CrossEntropyLoss(), x, y)
    errors = [_max_rel(reference.grads(reference.module_stages(model), nn.CrossEntropyLoss(), x, y, eps=eps), ref)
              for eps in (1e-2, 1e-3)]
    assert errors[0] < 1e-3
    assert errors[1] < errors[0] / 50  # O(eps^2): 100x smaller for 10x smaller eps


def test_reference_blackbox_leaf_by_finite_differences():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), hzo_ext.BlackBox(nn.Linear(5, 5), eps=1e-2)).double()
    x, y = batch()
    loss = nn.MSELoss(reduction="sum")
    yd = torch.randn(4, 5, dtype=torch.float64)
    ref = _autograd(model, loss, x, yd)
    got = reference.grads(reference.module_stages(model), loss, x, yd, eps=1e-4)
    bb = list(model[2].parameters())
    assert _max_rel({p: got[p] for p in bb}, {p: ref[p] for p in bb}) <= 1e-9  # affine in its parameters: exact
    assert _max_rel(got, ref) <= 1e-6


def _sequential_suite():
    torch.manual_seed(0)
    yield "residual_gelu_mlp", deep_mlp(5, 6, residual=True), batch()
    g = torch.Generator().manual_seed(0)
    yield "digits_cnn", digits_cnn(width=3).double(), (torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64),
                                                     torch.tensor([1, 7]))
    yield "resnet20_cifar", resnet20_cifar(num_classes=5, width=2).double(), \
        (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 4]))
    yield "blackbox_mlp", nn.Sequential(nn.Linear(6, 5), nn.GELU(), hzo_ext.BlackBox(nn.Linear(5, 5)),
                                        nn.Tanh(), nn.Linear(5, 5)).double(), batch()


@pytest.mark.parametrize("name", ["residual_gelu_mlp", "digits_cnn", "resnet20_cifar", "blackbox_mlp"])
def test_engines_agree_with_the_reference_on_sequential_models(name):
    """Every engine and split policy against the reference with the same cuts and the same split
    points (the plan's: with SPP, bisect keeps barrier stages at the right end), float64."""
    model, (x, y) = next((m, b) for n, m, b in _sequential_suite() if n == name)
    loss = nn.CrossEntropyLoss()
    # the C++ executor leaves zeroth-order leaves (BlackBox) to the Python path
    executors = ("python", "cpp") if hzo_ext.has_extension() and name != "blackbox_mlp" else ("python",)
    runs = [{}] + [{"split": split, "executor": executor} for split in ("bisect", "chain") for executor in executors]
    for kw in runs:
        model.zero_grad(set_to_none=True)
        est = hzo_ext.HZO(model, loss, eps=1e-3, **kw)
        est.backward(x, y)
        if kw:
            assert (est.engine, est.executor) == ("stages", kw["executor"])
            at = {(s.i, s.j): s.m for s in est.plan(x).splits}
            ref = reference.grads(reference.module_stages(model), loss, x, y, eps=1e-3,
                                  split=lambda i, j: at[i, j])
        else:
            assert est.engine == "ops"
            ref = reference.grads(reference.op_stages(model), loss, x, y, eps=1e-3, split="chain")
        got = {p: p.grad for p in model.parameters() if p.requires_grad}
        assert _max_rel(got, ref) <= 1e-10, kw


def test_the_library_never_imports_the_applications():
    """hzo_ext and every library module import without hzo_ext.apps (the CLI, training, studies)."""
    import pathlib
    import subprocess
    import sys
    lib = sorted(p.stem for p in pathlib.Path(hzo_ext.__file__).parent.glob("*.py")
                 if p.stem not in ("__init__", "__main__"))
    assert {"estimator", "opengine", "registry", "graph", "reference"} <= set(lib)
    code = ("import importlib, sys\n"
            f"for m in {lib!r}: importlib.import_module('hzo_ext.' + m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('hzo_ext.apps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
