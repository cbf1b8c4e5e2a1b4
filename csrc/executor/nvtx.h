// NVTX ranges of the executor: hzo/estimate, hzo/level<k>, hzo/split<i>-<m>-<j>/{perturb,query,
// contract}, hzo/head, hzo/leaves. Header-only nvtx3, compiled only in CUDA builds
// (HZO_WITH_CUDA); elsewhere HZO_NVTX expands to nothing and its name is never built.
#pragma once

#ifdef HZO_WITH_CUDA
#include <nvtx3/nvToolsExt.h>

#include <string>

namespace hzo::exec {

class NvtxRange {
 public:
  explicit NvtxRange(const std::string& name) { nvtxRangePushA(name.c_str()); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace hzo::exec

// A range named `name` (a std::string expression) open until the end of the scope.
#define HZO_NVTX(var, name) ::hzo::exec::NvtxRange var(name)
#else
#define HZO_NVTX(var, name) ((void)0)
#endif
