// Argument checks shared by the CPU and CUDA implementations of the hzo_ext ops.
// Every message names the argument at fault; the fallback (hzo_ext/_torch_impl.py) raises the
// same exception type with the same text, checking in the same order (devices first).
#pragma once

#include <ATen/ATen.h>

#include "../core/elementwise.h"
#include "../core/hzo_math.h"

#include <optional>

namespace hzo {

void check_eps(double eps, const char* op);

// a [B, *S] floating, colors int64 [prod(S)] >= 0, probe_ids int64 [K] >= 0, same device.
void check_perturb_args(const at::Tensor& a, const at::Tensor& colors, const at::Tensor& probe_ids,
                        double eps);

// y [2, K, B, *T] floating, target [B, *T] same dtype, owner int64 [K, prod(T)] in
// [-1, num_inputs), same device. Returns num_inputs; when not given, max(owner) + 1.
int64_t check_contract_args(const at::Tensor& y, const at::Tensor& target, const at::Tensor& owner,
                            double eps, std::optional<int64_t> num_inputs);

// contract_spp: y [2, K, B, Cout, *T] floating, target [B, Cout, *T] same dtype and device,
// colors int64 [C * prod(S)], boxes int64 [2, sum(S)] (row 0: lo, row 1: hi per input position
// of each axis, empty or inside [0, T_a)), in_shape = [C, *S] with 1 to 3 spatial axes,
// channelwise needs Cout == C. Returns contiguous copies and the geometry, its lo/hi pointing
// into `boxes` (shared by the CPU and CUDA wrappers; on CUDA, call under the device guard).
struct ContractSppArgs {
  at::Tensor y, target, colors, boxes;
  BoxGeometry g;
};
ContractSppArgs prepare_contract_spp(const at::Tensor& y, const at::Tensor& target, const at::Tensor& colors,
                                     int64_t probe_start, const at::Tensor& boxes, at::IntArrayRef in_shape,
                                     bool channelwise, double eps);

// probe_elementwise: z floating, target same device, dtype and shape, act a code of Act.
void check_probe_elementwise_args(const at::Tensor& z, const at::Tensor& target, double eps, int64_t act);

// probe_linear: z [B, Q] floating, weight [Q, K] and target [B, Q] same device and dtype.
void check_probe_linear_args(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& target, double eps,
                             int64_t act);

// probe_conv2d: z [B, Cout, Ho, Wo] floating, weight [Cout, Cin / groups, KH, KW] and target
// same device and dtype, the geometry consistent (Ho, Wo those of a conv of in_size). Returns it.
ConvGeometry check_probe_conv2d_args(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& target,
                                     at::IntArrayRef in_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups, double eps, int64_t act);

// The owner map grouped by input coordinate, in (k, q) flat order: entries of coordinate s are
// perm[offsets[s] .. offsets[s+1]). Device-agnostic (built with ATen on owner's device).
struct OwnerCsr {
  at::Tensor perm;     // int64 [K * Q]: flat (k * Q + q) indices, stably sorted by owner
  at::Tensor offsets;  // int64 [num_inputs + 1]
};
OwnerCsr owner_csr(const at::Tensor& owner, int64_t num_inputs);

}  // namespace hzo
