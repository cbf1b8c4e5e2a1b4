// CPU kernels of the fused probes (probe_elementwise, probe_linear); the per-element math is
// csrc/core/elementwise.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "../../core/elementwise.h"
#include "../checks.h"

namespace hzo {
namespace {

// Calls body(std::integral_constant<int64_t, act>) so the act switch folds away in the inner
// loops (they vectorise where the function allows).
template <typename Body>
void with_act(int64_t act, Body&& body) {
  switch (static_cast<Act>(act)) {
#define HZO_ACT_CASE(code) \
    case Act::code: return body(std::integral_constant<int64_t, static_cast<int64_t>(Act::code)>{});
    HZO_ACT_CASE(kIdentity) HZO_ACT_CASE(kRelu) HZO_ACT_CASE(kLeakyRelu) HZO_ACT_CASE(kGelu)
    HZO_ACT_CASE(kGeluTanh) HZO_ACT_CASE(kTanh) HZO_ACT_CASE(kSigmoid) HZO_ACT_CASE(kSilu)
    HZO_ACT_CASE(kHardtanh) HZO_ACT_CASE(kElu) HZO_ACT_CASE(kHardswish) HZO_ACT_CASE(kHardsigmoid)
    HZO_ACT_CASE(kSoftplus)
#undef HZO_ACT_CASE
    default: TORCH_CHECK_VALUE(false, "hzo_ext: unknown act code ", act);
  }
}

}  // namespace

at::Tensor probe_elementwise_cpu(const at::Tensor& z_in, const at::Tensor& target_in, double eps, int64_t act,
                                 double alpha, double beta) {
  check_probe_elementwise_args(z_in, target_in, eps, act);
  const auto z = z_in.contiguous();
  const auto target = target_in.contiguous();
  auto out = at::empty_like(z);
  const int64_t n = z.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "hzo_ext::probe_elementwise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* tp = target.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps), inv = acc_t(1) / (acc_t(2) * e);
    const acc_t al = static_cast<acc_t>(alpha), be = static_cast<acc_t>(beta);
    with_act(act, [&](auto code) {
      at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          o[i] = static_cast<scalar_t>(
              fused_term<acc_t>(code.value, static_cast<acc_t>(tp[i]), static_cast<acc_t>(zp[i]), e, al, be) * inv);
        }
      });
    });
  });
  return out;
}

at::Tensor probe_linear_cpu(const at::Tensor& z_in, const at::Tensor& weight, const at::Tensor& target_in,
                            double eps, int64_t act, double alpha, double beta) {
  check_probe_linear_args(z_in, weight, target_in, eps, act);
  const auto z = z_in.contiguous();
  const auto target = target_in.contiguous();
  const auto wt = weight.t().contiguous();  // [K, Q]: column k of A is row k here, contiguous in q
  const int64_t B = z.size(0), Q = z.size(1), K = weight.size(1);
  auto out = at::empty({B, K}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "hzo_ext::probe_linear", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* tp = target.data_ptr<scalar_t>();
    const scalar_t* wp = wt.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps), inv = acc_t(1) / (acc_t(2) * e);
    const acc_t al = static_cast<acc_t>(alpha), be = static_cast<acc_t>(beta);
    with_act(act, [&](auto code) {
      // One (b, k) output per iteration: a fixed summation order over q.
      at::parallel_for(0, B * K, 1 + (1 << 14) / std::max<int64_t>(Q, 1), [&](int64_t begin, int64_t end) {
        for (int64_t bk = begin; bk < end; ++bk) {
          const int64_t b = bk / K, k = bk % K;
          const scalar_t* zr = zp + b * Q;
          const scalar_t* tr = tp + b * Q;
          const scalar_t* wr = wp + k * Q;
          acc_t acc = 0;
          for (int64_t q = 0; q < Q; ++q) {
            acc += fused_term<acc_t>(code.value, static_cast<acc_t>(tr[q]), static_cast<acc_t>(zr[q]),
                                     e * static_cast<acc_t>(wr[q]), al, be);
          }
          o[bk] = static_cast<scalar_t>(acc * inv);
        }
      });
    });
  });
  return out;
}

at::Tensor probe_conv2d_cpu(const at::Tensor& z_in, const at::Tensor& weight_in, const at::Tensor& target_in,
                            at::IntArrayRef in_size, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, double eps, int64_t act, double alpha,
                            double beta) {
  const ConvGeometry g =
      check_probe_conv2d_args(z_in, weight_in, target_in, in_size, stride, padding, dilation, groups, eps, act);
  const auto z = z_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto target = target_in.contiguous();
  auto out = at::empty({g.B, g.Cin, g.H, g.W}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "hzo_ext::probe_conv2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* tp = target.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps), inv = acc_t(1) / (acc_t(2) * e);
    const acc_t al = static_cast<acc_t>(alpha), be = static_cast<acc_t>(beta);
    const auto to_acc = [](scalar_t v) { return static_cast<acc_t>(v); };
    with_act(act, [&](auto code) {
      at::parallel_for(0, g.B * g.Cin, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bc = begin; bc < end; ++bc) {
          const int64_t b = bc / g.Cin, c = bc % g.Cin;
          for (int64_t iy = 0; iy < g.H; ++iy) {
            for (int64_t ix = 0; ix < g.W; ++ix) {
              const acc_t v = conv_probe_input<acc_t>(zp, wp, tp, g, b, c, iy, ix, code.value, e, al, be, to_acc);
              o[(bc * g.H + iy) * g.W + ix] = static_cast<scalar_t>(v * inv);
            }
          }
        }
      });
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(hzo_ext, CPU, m) {
  m.impl("probe_conv2d", &probe_conv2d_cpu);
  m.impl("probe_elementwise", &probe_elementwise_cpu);
  m.impl("probe_linear", &probe_linear_cpu);
}

}  // namespace hzo
