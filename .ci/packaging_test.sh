#!/usr/bin/env bash
# Builds a wheel, installs it into a fresh virtual environment (no source tree on the path),
# imports it and runs both ops against the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf dist
.venv/bin/python -m pip wheel -q --no-build-isolation --no-deps -w dist .
ls -l dist
fresh=$(mktemp -d)
python3 -m venv "$fresh/venv"
"$fresh/venv/bin/python" -m pip install -q "$(ls dist/hzo_ext-*.whl)" "$(.venv/bin/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])')"
cd "$fresh"
"$fresh/venv/bin/hzo-ext" info
HZO_EXPECT_EXTENSION=1 "$fresh/venv/bin/python" - <<'PY'
import torch, hzo_ext
from hzo_ext import _torch_impl, ops
assert hzo_ext.has_extension(), hzo_ext.info()["extension_error"]
assert "site-packages" in hzo_ext.__file__, hzo_ext.__file__
a = torch.randn(4, 6, dtype=torch.float64)
ids = torch.arange(6)
y = ops.perturb(a, ops.dense_colors(6), ids, 1e-3)
torch.testing.assert_close(y, _torch_impl.perturb(a, ops.dense_colors(6), ids, 1e-3), rtol=0, atol=0)
W = torch.randn(3, 6, dtype=torch.float64)
target = torch.randn(4, 3, dtype=torch.float64)
g = ops.contract(y @ W.T, target, ops.dense_owner(ids, 3), 1e-3)
torch.testing.assert_close(g, target @ W, rtol=1e-9, atol=1e-12)
print("wheel OK:", hzo_ext.__file__)
PY
rm -rf "$fresh"
