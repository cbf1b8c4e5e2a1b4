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

// ---- the fused probe of a Conv2d-then-elementwise piece (probe_conv2d) ----------------------

// z, target: [B, Cout, Ho, Wo]; weight [Cout, Cin / groups, KH, KW]; the probed input [B, Cin, H, W].
struct ConvGeometry {
  int64_t B = 0, Cin = 0, Cout = 0, H = 0, W = 0, Ho = 0, Wo = 0, KH = 0, KW = 0;
  int64_t stride[2] = {1, 1}, padding[2] = {0, 0}, dilation[2] = {1, 1};
  int64_t groups = 1;
};

// out[b, c, iy, ix] before the 1/(2 eps) scale: the sum, over every output (o, oy, ox) the input
// (c, iy, ix) feeds through tap (ky, kx) (o in c's group), of
// target * (s(z + eps W[o, c', ky, kx]) - s(z - eps W[o, c', ky, kx])), in the order (o, ky, kx).
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Acc, typename T, typename ToAcc>
HZO_HOST_DEVICE Acc conv_probe_input(const T* z, const T* weight, const T* target, const ConvGeometry& g, int64_t b,
                                     int64_t c, int64_t iy, int64_t ix, int64_t act, Acc eps, Acc alpha, Acc beta,
                                     ToAcc to_acc) {
  const int64_t cin_g = g.Cin / g.groups, cout_g = g.Cout / g.groups;
  const int64_t group = c / cin_g, cl = c % cin_g;
  Acc acc = 0;
  for (int64_t o = group * cout_g; o < (group + 1) * cout_g; ++o) {
    for (int64_t ky = 0; ky < g.KH; ++ky) {
      const int64_t ny = iy + g.padding[0] - ky * g.dilation[0];
      if (ny < 0 || ny % g.stride[0] != 0 || ny / g.stride[0] >= g.Ho) continue;
      const int64_t oy = ny / g.stride[0];
      for (int64_t kx = 0; kx < g.KW; ++kx) {
        const int64_t nx = ix + g.padding[1] - kx * g.dilation[1];
        if (nx < 0 || nx % g.stride[1] != 0 || nx / g.stride[1] >= g.Wo) continue;
        const int64_t q = ((b * g.Cout + o) * g.Ho + oy) * g.Wo + nx / g.stride[1];
        const Acc h = eps * to_acc(weight[((o * cin_g + cl) * g.KH + ky) * g.KW + kx]);
        acc += fused_term<Acc>(act, to_acc(target[q]), to_acc(z[q]), h, alpha, beta);
      }
    }
  }
  return acc;
}

}  // namespace hzo
