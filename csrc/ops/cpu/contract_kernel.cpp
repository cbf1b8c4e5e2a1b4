#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../../core/hzo_math.h"
#include "../checks.h"

namespace hzo {

static at::Tensor contract_cpu_impl(const at::Tensor& y_in, const at::Tensor& target_in,
                                    const at::Tensor& owner_in, double eps,
                                    std::optional<int64_t> sized) {
  const int64_t num_inputs = check_contract_args(y_in, target_in, owner_in, eps, sized);
  const auto y = y_in.contiguous();
  const auto target = target_in.contiguous();
  const auto owner = owner_in.contiguous();
  const int64_t K = y.size(1), B = y.size(2), Q = owner.size(1);
  auto out = at::empty({B, num_inputs}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "hzo_ext::contract", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* tp = target.data_ptr<scalar_t>();
    const int64_t* op = owner.data_ptr<int64_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const acc_t inv_two_eps = static_cast<acc_t>(1.0 / (2.0 * eps));
    // Rows are independent: each thread owns whole output rows, so no atomics and a fixed order.
    at::parallel_for(0, B, 1, [&](int64_t b_begin, int64_t b_end) {
      std::vector<acc_t> acc(num_inputs);
      for (int64_t b = b_begin; b < b_end; ++b) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        contract_row<scalar_t, acc_t>(yp, tp + b * Q, op, K, B, Q, b, acc.data());
        for (int64_t s = 0; s < num_inputs; ++s) dst[b * num_inputs + s] = static_cast<scalar_t>(acc[s] * inv_two_eps);
      }
    });
  });
  return out;
}

at::Tensor contract_cpu(const at::Tensor& y, const at::Tensor& target, const at::Tensor& owner, double eps) {
  return contract_cpu_impl(y, target, owner, eps, std::nullopt);
}

at::Tensor contract_sized_cpu(const at::Tensor& y, const at::Tensor& target, const at::Tensor& owner,
                              double eps, int64_t num_inputs) {
  return contract_cpu_impl(y, target, owner, eps, num_inputs);
}

TORCH_LIBRARY_IMPL(hzo_ext, CPU, m) {
  m.impl("contract", &contract_cpu);
  m.impl("contract_sized", &contract_sized_cpu);
}

}  // namespace hzo
