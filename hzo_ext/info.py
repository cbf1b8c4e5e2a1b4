"""Build diagnostics: what was compiled, for which torch/CUDA, which kernels are present."""
from __future__ import annotations

import torch

from . import _ext

OPS = ("perturb", "contract", "contract_sized", "contract_spp", "probe_elementwise", "probe_linear",
       "probe_conv2d")


def info() -> dict:
    """A dict describing the running torch and the compiled extension (or why it did not load)."""
    d = {
        "hzo_ext_version": __import__("hzo_ext").__version__,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension_loaded": _ext.has_extension(),
        "extension_error": _ext.load_error,
        "built_for": None,
        "kernels": {},
    }
    if _ext.has_extension():
        d["built_for"] = dict(_ext._C.build_info())
        for op in OPS:
            d["kernels"][op] = [key for key in ("CPU", "CUDA")
                                if torch._C._dispatch_has_kernel_for_dispatch_key(f"hzo_ext::{op}", key)]
    return d


def format_info(d: dict | None = None) -> str:
    d = info() if d is None else d
    lines = [f"hzo_ext {d['hzo_ext_version']}",
             f"torch {d['torch_version']} (CUDA {d['torch_cuda_version']}, device available: {d['cuda_available']})"]
    if d["extension_loaded"]:
        b = d["built_for"]
        cuda = f"CUDA {b['cuda_version']} for sm {b['cuda_archs']}" if b["with_cuda"] else "no CUDA kernels"
        lines.append(f"extension: loaded, built against torch {b['torch_version']}, {cuda}")
        for op, keys in d["kernels"].items():
            lines.append(f"  hzo_ext::{op}: {', '.join(keys) or 'none'}")
    else:
        lines.append(f"extension: NOT loaded ({d['extension_error']}); using the pure-PyTorch reference ops")
    return "\n".join(lines)
