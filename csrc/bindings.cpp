// pybind11 module hzo_ext._C: importing it registers the torch ops (ops.cpp, cpu/, cuda/) and
// exposes build diagnostics. Ops go through the dispatcher, not through pybind11.
#include <torch/extension.h>

namespace hzo::exec {
void bind(pybind11::module_& m);  // csrc/executor/bind.cpp
}

#ifndef HZO_BUILD_TORCH_VERSION
#define HZO_BUILD_TORCH_VERSION "unknown"
#endif
#ifndef HZO_BUILD_CUDA_ARCHS
#define HZO_BUILD_CUDA_ARCHS ""
#endif
#ifndef HZO_BUILD_CUDA_VERSION
#define HZO_BUILD_CUDA_VERSION ""
#endif

void init_plan_bindings(pybind11::module_& m);  // plan_bindings.cpp: _C.build_plan

PYBIND11_MODULE(_C, m) {
  m.doc() = "hzo_ext compiled core: torch ops hzo_ext::perturb / contract / contract_sized";
  m.def("build_info", [] {
    pybind11::dict d;
    d["torch_version"] = HZO_BUILD_TORCH_VERSION;
#ifdef HZO_WITH_CUDA
    d["with_cuda"] = true;
    d["cuda_version"] = HZO_BUILD_CUDA_VERSION;
    d["cuda_archs"] = HZO_BUILD_CUDA_ARCHS;
#else
    d["with_cuda"] = false;
    d["cuda_version"] = pybind11::none();
    d["cuda_archs"] = "";
#endif
    return d;
  });
  init_plan_bindings(m);
  hzo::exec::bind(m);
}
