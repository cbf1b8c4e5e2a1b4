// Schemas of the hzo_ext ops (DESIGN.md "Torch ops"). Kernels: cpu/ and cuda/; fake kernels and
// autograd formulas: hzo_ext/ops.py; pure-PyTorch reference: hzo_ext/_torch_impl.py.
#include <torch/library.h>

TORCH_LIBRARY(hzo_ext, m) {
  // [B, *S] -> [2, K, B, *S]: copy k moves every coordinate whose color is probe_ids[k] by +eps
  // (first half) or -eps (second half).
  m.def("perturb(Tensor a, Tensor colors, Tensor probe_ids, float eps) -> Tensor");
  // [2, K, B, *T] -> [B, prod(S)] with prod(S) = max(owner) + 1:
  // out[b, owner[k,q]] += target[b,q] * (y[0,k,b,q] - y[1,k,b,q]) / (2 eps).
  m.def("contract(Tensor y, Tensor target, Tensor owner, float eps) -> Tensor");
  // contract with the number of input coordinates given (trailing coordinates may own no
  // output; needed for static shapes under torch.compile).
  m.def("contract_sized(Tensor y, Tensor target, Tensor owner, float eps, int num_inputs) -> Tensor");
  // contract with the owner map computed on the fly from an SPP coloring's geometry: y is
  // [2, K, B, Cout, *T] for the probes (colors) probe_start .. probe_start + K - 1; input
  // coordinate (c, p) of color probe_start + k gets the sum over its footprint box (boxes
  // [2, sum(S)]: lo/hi output interval per input position of each axis; output channel c only
  // when channelwise, else all) of target * (y[0, k] - y[1, k]) / (2 eps); others get 0.
  // Returns [B, prod(in_shape)].
  m.def("contract_spp(Tensor y, Tensor target, Tensor colors, int probe_start, Tensor boxes, int[] in_shape, "
        "bool channelwise, float eps) -> Tensor");
  // Fused probes (DESIGN.md "Fused probes"): the +-eps pairs, the masking and the contraction of
  // an affine-then-elementwise piece in one kernel, no perturbed copy in memory. `act` is the
  // elementwise function's code (csrc/core/elementwise.h), alpha/beta its settings.
  // Diagonal affine part (the piece is s alone): out = target * (s(z + eps) - s(z - eps)) / (2 eps).
  m.def("probe_elementwise(Tensor z, Tensor target, float eps, int act, float alpha, float beta) -> Tensor");
  // Dense affine part A = weight [Q, K] (a Linear's weight), z = A a + b [B, Q] the clean output:
  // out[b, k] = sum_q target[b, q] * (s(z[b, q] + eps A[q, k]) - s(z[b, q] - eps A[q, k])) / (2 eps).
  m.def("probe_linear(Tensor z, Tensor weight, Tensor target, float eps, int act, float alpha, float beta) "
        "-> Tensor");
  // Conv2d affine part (weight [Cout, Cin / groups, KH, KW]), z = conv(a) + bias [B, Cout, Ho, Wo] the
  // clean output, in_size = [H, W] of the probed input a [B, Cin, H, W]: out[b, c, iy, ix] = sum over
  // the outputs (o, oy, ox) input (c, iy, ix) feeds through tap (ky, kx) of
  // target * (s(z + eps W[o, c', ky, kx]) - s(z - eps W[o, c', ky, kx])) / (2 eps).
  m.def("probe_conv2d(Tensor z, Tensor weight, Tensor target, int[] in_size, int[] stride, int[] padding, "
        "int[] dilation, int groups, float eps, int act, float alpha, float beta) -> Tensor");
}
