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

// A range that may span calls (hzo/estimate opens in the clean forward and closes after the
// leaves): start() ends the previous one.
class NvtxSpan {
 public:
  void start(const char* name) {
    end();
    id_ = nvtxRangeStartA(name);
    open_ = true;
  }
  void end() {
    if (open_) nvtxRangeEnd(id_);
    open_ = false;
  }
  ~NvtxSpan() { end(); }

 private:
  nvtxRangeId_t id_ = 0;
  bool open_ = false;
};

}  // namespace hzo::exec

// A range named `name` (a std::string expression) open until the end of the scope.
#define HZO_NVTX(var, name) ::hzo::exec::NvtxRange var(name)
#else
namespace hzo::exec {
class NvtxSpan {
 public:
  void start(const char*) {}
  void end() {}
};
}  // namespace hzo::exec
#define HZO_NVTX(var, name) ((void)0)
#endif
