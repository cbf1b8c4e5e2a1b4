#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../../core/hzo_math.h"
#include "../checks.h"

namespace hzo {

at::Tensor perturb_cpu(const at::Tensor& a_in, const at::Tensor& colors_in, const at::Tensor& probe_in,
                       double eps) {
  check_perturb_args(a_in, colors_in, probe_in, eps);
  const auto a = a_in.contiguous();
  const auto colors = colors_in.contiguous();
  const auto probe_ids = probe_in.contiguous();
  const int64_t K = probe_ids.numel(), B = a.size(0), N = colors.numel();
  std::vector<int64_t> out_shape{2, K};
  for (auto s : a.sizes()) out_shape.push_back(s);
  auto out = at::empty(out_shape, a.options());
  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "hzo_ext::perturb", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = a.data_ptr<scalar_t>();
    const int64_t* col = colors.data_ptr<int64_t>();
    const int64_t* probe = probe_ids.data_ptr<int64_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps);
    // One grain = one or more whole [N] rows, so the index math runs once per row.
    at::parallel_for(0, total / std::max<int64_t>(N, 1), 1 + (1 << 14) / std::max<int64_t>(N, 1),
                     [&](int64_t row_begin, int64_t row_end) {
      for (int64_t r = row_begin; r < row_end; ++r) {
        const PerturbIndex ix = unravel_perturb(r * N, K, B, N);
        const scalar_t* a_row = src + ix.row * N;
        scalar_t* o = dst + r * N;
        const int64_t pc = probe[ix.probe];
        for (int64_t i = 0; i < N; ++i) {
          o[i] = static_cast<scalar_t>(
              perturbed_value<acc_t>(static_cast<acc_t>(a_row[i]), col[i], pc, ix.side, e));
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(hzo_ext, CPU, m) { m.impl("perturb", &perturb_cpu); }

}  // namespace hzo
