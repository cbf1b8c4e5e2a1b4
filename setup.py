"""Builds hzo_ext._C with torch.utils.cpp_extension (ninja).

CPU sources always; CUDA sources when FORCE_CUDA=1, or when a GPU and a CUDA toolkit are
present. With FORCE_CUDA and no TORCH_CUDA_ARCH_LIST it targets sm_80 and sm_90.
"""
import glob
import os
import re
import subprocess

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvcc_version():
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else ""


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                  + glob.glob(os.path.join(ROOT, "csrc", "core", "*.cpp"))
                  + glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cpp"))
                  + glob.glob(os.path.join(ROOT, "csrc", "ops", "cpu", "*.cpp"))
                  + glob.glob(os.path.join(ROOT, "csrc", "executor", "*.cpp")))
    defines = [f'-DHZO_BUILD_TORCH_VERSION="{torch.__version__}"']
    cxx = ["-O3"]
    if not _want_cuda():
        print(f"hzo_ext: building CPU kernels only ({len(sources)} sources); set FORCE_CUDA=1 for CUDA")
        return cpp_extension.CppExtension("hzo_ext._C", sources, extra_compile_args={"cxx": cxx + defines})
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cpp"))
                       + glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu")))
    defines += ["-DHZO_WITH_CUDA", f'-DHZO_BUILD_CUDA_ARCHS="{archs}"',
                f'-DHZO_BUILD_CUDA_VERSION="{_nvcc_version()}"']
    print(f"hzo_ext: building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} "
          f"(CUDA_HOME={cpp_extension.CUDA_HOME}, nvcc {_nvcc_version()})")
    return cpp_extension.CUDAExtension(
        "hzo_ext._C", sources + cuda_sources,
        extra_compile_args={"cxx": cxx + defines, "nvcc": ["-O3", "-lineinfo"] + defines})


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
