// The elementwise functions the fused probes evaluate, and the fused-probe terms, shared by the
// CPU loops and the CUDA kernels. Torch-free. The codes are the registry's (hzo_ext/registry.py,
// ElementwiseOp.code); each function matches torch's definition of the op of that name.
#pragma once

#include <cmath>
#include <cstdint>

#include "hzo_math.h"

namespace hzo {

enum class Act : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,   // alpha: negative_slope
  kGelu = 3,        // erf form
  kGeluTanh = 4,    // approximate='tanh'
  kTanh = 5,
  kSigmoid = 6,
  kSilu = 7,
  kHardtanh = 8,    // alpha: min_val, beta: max_val (ReLU6: 0, 6)
  kElu = 9,         // alpha
  kHardswish = 10,
  kHardsigmoid = 11,
  kSoftplus = 12,   // alpha: beta, beta: threshold
  kCount = 13,
};

#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename T>
HZO_HOST_DEVICE T act_value(int64_t act, T x, T alpha, T beta) {
#ifndef __CUDA_ARCH__
  using std::erf;  // device code: CUDA's own overloads
  using std::exp;
  using std::log1p;
  using std::tanh;
#endif
  const T one(1), half(0.5);
  switch (static_cast<Act>(act)) {
    case Act::kIdentity: return x;
    case Act::kRelu: return x > T(0) ? x : T(0);
    case Act::kLeakyRelu: return x > T(0) ? x : x * alpha;
    case Act::kGelu: return half * x * (one + erf(x * T(0.70710678118654752440)));
    case Act::kGeluTanh: {
      const T inner = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
      return half * x * (one + tanh(inner));
    }
    case Act::kTanh: return tanh(x);
    case Act::kSigmoid: return one / (one + exp(-x));
    case Act::kSilu: return x / (one + exp(-x));
    case Act::kHardtanh: return x < alpha ? alpha : (x > beta ? beta : x);
    case Act::kElu: return x > T(0) ? x : alpha * (exp(x) - one);
    case Act::kHardswish: {
      const T r = x + T(3);
      const T c = r < T(0) ? T(0) : (r > T(6) ? T(6) : r);
      return x * c / T(6);
    }
    case Act::kHardsigmoid: {
      const T r = x / T(6) + half;
      return r < T(0) ? T(0) : (r > one ? one : r);
    }
    case Act::kSoftplus: return alpha * x > beta ? x : log1p(exp(alpha * x)) / alpha;
    default: return x;
  }
}

// One term of a fused probe before the 1/(2 eps) scale: the +-h pair of s at z, contracted with
// the target, target * (s(z + h) - s(z - h)). h = eps * A[q, k], the fold of the affine part.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename T>
HZO_HOST_DEVICE T fused_term(int64_t act, T target, T z, T h, T alpha, T beta) {
  return contract_term<T>(target, act_value<T>(act, z + h, alpha, beta), act_value<T>(act, z - h, alpha, beta));
}

}  // namespace hzo
