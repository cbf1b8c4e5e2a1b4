// CUDA implementations of the hzo_ext ops: checks and layout here, kernels in *.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "launch.h"

namespace hzo {

static DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "hzo_ext: unsupported dtype ", t);
  }
}

static void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor perturb_cuda(const at::Tensor& a_in, const at::Tensor& colors_in, const at::Tensor& probe_in,
                        double eps) {
  check_perturb_args(a_in, colors_in, probe_in, eps);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous();
  const auto colors = colors_in.contiguous();
  const auto probe_ids = probe_in.contiguous();
  std::vector<int64_t> out_shape{2, probe_ids.numel()};
  for (auto s : a.sizes()) out_shape.push_back(s);
  auto out = at::empty(out_shape, a.options());
  const char* err = launch_perturb(to_dtype(a.scalar_type()), a.data_ptr(), colors.data_ptr<int64_t>(),
                                   probe_ids.data_ptr<int64_t>(), out.data_ptr(), probe_ids.numel(),
                                   a.size(0), colors.numel(), eps, current_stream());
  TORCH_CHECK(err == nullptr, "hzo_ext::perturb: CUDA launch failed: ", err);
  return out;
}

static at::Tensor contract_cuda_impl(const at::Tensor& y_in, const at::Tensor& target_in,
                                     const at::Tensor& owner_in, double eps, std::optional<int64_t> sized) {
  const int64_t num_inputs = check_contract_args(y_in, target_in, owner_in, eps, sized);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto y = y_in.contiguous();
  const auto target = target_in.contiguous();
  const int64_t K = y.size(1), B = y.size(2), Q = owner_in.size(1);
  auto out = at::empty({B, num_inputs}, y.options());
  const OwnerCsr csr = owner_csr(owner_in.contiguous(), num_inputs);
  const char* err = launch_contract(to_dtype(y.scalar_type()), y.data_ptr(), target.data_ptr(),
                                    csr.perm.data_ptr<int64_t>(), csr.offsets.data_ptr<int64_t>(), out.data_ptr(),
                                    K, B, Q, num_inputs, eps, current_stream());
  TORCH_CHECK(err == nullptr, "hzo_ext::contract: CUDA launch failed: ", err);
  return out;
}

at::Tensor contract_cuda(const at::Tensor& y, const at::Tensor& target, const at::Tensor& owner, double eps) {
  return contract_cuda_impl(y, target, owner, eps, std::nullopt);
}

at::Tensor contract_sized_cuda(const at::Tensor& y, const at::Tensor& target, const at::Tensor& owner,
                               double eps, int64_t num_inputs) {
  return contract_cuda_impl(y, target, owner, eps, num_inputs);
}

at::Tensor contract_spp_cuda(const at::Tensor& y_in, const at::Tensor& target_in, const at::Tensor& colors_in,
                             int64_t probe_start, const at::Tensor& boxes_in, at::IntArrayRef in_shape,
                             bool channelwise, double eps) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const ContractSppArgs args =
      prepare_contract_spp(y_in, target_in, colors_in, probe_start, boxes_in, in_shape, channelwise, eps);
  const at::Tensor &y = args.y, &target = args.target, &colors = args.colors;
  const BoxGeometry& g = args.g;
  auto out = at::empty({y.size(2), g.C * g.in_spatial()}, y.options());
  const char* err = launch_contract_spp(to_dtype(y.scalar_type()), y.data_ptr(), target.data_ptr(),
                                        colors.data_ptr<int64_t>(), g, out.data_ptr(), y.size(1), y.size(2),
                                        probe_start, eps, current_stream());
  TORCH_CHECK(err == nullptr, "hzo_ext::contract_spp: CUDA launch failed: ", err);
  return out;
}

at::Tensor probe_elementwise_cuda(const at::Tensor& z_in, const at::Tensor& target_in, double eps, int64_t act,
                                  double alpha, double beta) {
  check_probe_elementwise_args(z_in, target_in, eps, act);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto z = z_in.contiguous();
  const auto target = target_in.contiguous();
  auto out = at::empty_like(z);
  const char* err = launch_probe_elementwise(to_dtype(z.scalar_type()), z.data_ptr(), target.data_ptr(),
                                             out.data_ptr(), z.numel(), eps, act, alpha, beta, current_stream());
  TORCH_CHECK(err == nullptr, "hzo_ext::probe_elementwise: CUDA launch failed: ", err);
  return out;
}

at::Tensor probe_linear_cuda(const at::Tensor& z_in, const at::Tensor& weight, const at::Tensor& target_in,
                             double eps, int64_t act, double alpha, double beta) {
  check_probe_linear_args(z_in, weight, target_in, eps, act);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto z = z_in.contiguous();
  const auto target = target_in.contiguous();
  const auto wt = weight.t().contiguous();
  auto out = at::empty({z.size(0), weight.size(1)}, z.options());
  const char* err = launch_probe_linear(to_dtype(z.scalar_type()), z.data_ptr(), wt.data_ptr(), target.data_ptr(),
                                        out.data_ptr(), z.size(0), z.size(1), weight.size(1), eps, act, alpha, beta,
                                        current_stream());
  TORCH_CHECK(err == nullptr, "hzo_ext::probe_linear: CUDA launch failed: ", err);
  return out;
}

at::Tensor probe_conv2d_cuda(const at::Tensor& z_in, const at::Tensor& weight_in, const at::Tensor& target_in,
                             at::IntArrayRef in_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, double eps, int64_t act, double alpha,
                             double beta) {
  const ConvGeometry g =
      check_probe_conv2d_args(z_in, weight_in, target_in, in_size, stride, padding, dilation, groups, eps, act);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto z = z_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto target = target_in.contiguous();
  auto out = at::empty({g.B, g.Cin, g.H, g.W}, z.options());
  const char* err = launch_probe_conv2d(to_dtype(z.scalar_type()), z.data_ptr(), weight.data_ptr(), target.data_ptr(),
                                        out.data_ptr(), g, eps, act, alpha, beta, current_stream());
  TORCH_CHECK(err == nullptr, "hzo_ext::probe_conv2d: CUDA launch failed: ", err);
  return out;
}

TORCH_LIBRARY_IMPL(hzo_ext, CUDA, m) {
  m.impl("probe_conv2d", &probe_conv2d_cuda);
  m.impl("probe_elementwise", &probe_elementwise_cuda);
  m.impl("probe_linear", &probe_linear_cuda);
  m.impl("contract_spp", &contract_spp_cuda);
  m.impl("perturb", &perturb_cuda);
  m.impl("contract", &contract_cuda);
  m.impl("contract_sized", &contract_sized_cuda);
}

}  // namespace hzo
