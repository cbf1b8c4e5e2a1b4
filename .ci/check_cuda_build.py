"""Asserts that hzo_ext._C holds the CUDA kernels for sm_80 and sm_90 and registers them."""
import glob
import os
import subprocess
import sys

import torch

import hzo_ext

info = hzo_ext.info()
assert info["extension_loaded"], info["extension_error"]
assert info["built_for"]["with_cuda"], "extension was built without CUDA kernels"
for op, keys in info["kernels"].items():
    assert keys == ["CPU", "CUDA"], f"hzo_ext::{op} kernels: {keys}"

so = glob.glob(os.path.join(os.path.dirname(hzo_ext.__file__), "_C*.so"))[0]
# cuobjdump ships with triton, a dependency of the CUDA build of torch.
tools = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "triton", "backends", "nvidia", "bin", "cuobjdump"))
if not tools:
    sys.exit("cuobjdump not found next to triton; cannot list the CUDA objects")
elfs = subprocess.check_output([tools[0], "--list-elf", so], text=True)
print(elfs)
for kernel in ("perturb_kernel", "contract_kernel", "contract_spp_kernel", "probe_kernel"):
    for arch in ("sm_80", "sm_90"):
        assert f"{kernel}.{arch}.cubin" in elfs, f"{kernel} has no {arch} code in {so}"
print("CUDA build OK:", info["built_for"])
