#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../../core/hzo_math.h"
#include "../checks.h"

namespace hzo {

template <typename Acc>
struct CastToAcc {
  template <typename T>
  Acc operator()(T v) const { return static_cast<Acc>(v); }
};

// contract with owners from the footprint boxes: out[b, (c, p)] = box sum of input (c, p) under
// its probe (color - probe_start, when in [0, K)), else 0. Each output element is computed once
// by one thread in a fixed order: deterministic.
at::Tensor contract_spp_cpu(const at::Tensor& y_in, const at::Tensor& target_in, const at::Tensor& colors_in,
                            int64_t probe_start, const at::Tensor& boxes_in, at::IntArrayRef in_shape,
                            bool channelwise, double eps) {
  const ContractSppArgs args =
      prepare_contract_spp(y_in, target_in, colors_in, probe_start, boxes_in, in_shape, channelwise, eps);
  const at::Tensor &y = args.y, &target = args.target, &colors = args.colors;
  const BoxGeometry& g = args.g;
  const int64_t K = y.size(1), B = y.size(2), Q = g.out_features(), P = g.in_spatial();
  auto out = at::empty({B, g.C * P}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "hzo_ext::contract_spp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* ym = yp + K * B * Q;
    const scalar_t* tp = target.data_ptr<scalar_t>();
    const int64_t* col = colors.data_ptr<int64_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const acc_t inv_two_eps = static_cast<acc_t>(1.0 / (2.0 * eps));
    at::parallel_for(0, B * g.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {  // row = (b, c)
        const int64_t b = row / g.C, c = row % g.C;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t k = col[c * P + p] - probe_start;
          acc_t v = 0;
          if (k >= 0 && k < K) {
            const int64_t at = (k * B + b) * Q;
            v = box_contract<acc_t>(yp + at, ym + at, tp + b * Q, g, c, p, CastToAcc<acc_t>{}) * inv_two_eps;
          }
          dst[row * P + p] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(hzo_ext, CPU, m) { m.impl("contract_spp", &contract_spp_cpu); }

}  // namespace hzo
