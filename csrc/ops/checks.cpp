#include "checks.h"

#include "../core/elementwise.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// The messages here and those of hzo_ext/_torch_impl.py (the fallback) are the same text and
// exception type: ValueError (TORCH_CHECK_VALUE) for values, shapes and devices, TypeError
// (TORCH_CHECK_TYPE) for dtypes; tensors' shapes print as [2, 4], dtypes as torch.float32.
namespace hzo {

// Python's repr of a float (the shortest form that parses back to v), so both paths print eps alike.
static std::string py_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  int digits = 1;  // the fewest significant digits that parse back to v
  for (;; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*e", digits - 1, v);
    if (digits == 17 || std::strtod(buf, nullptr) == v) break;
  }
  const int exp10 = std::atoi(std::strchr(buf, 'e') + 1);
  if (exp10 < -4 || exp10 >= 16) return buf;  // Python's repr: 1e-05, 1.5e+16
  std::snprintf(buf, sizeof buf, "%.*f", std::max(digits - 1 - exp10, 0), v);
  std::string s = buf;
  return s.find('.') == std::string::npos ? s + ".0" : s;
}

static std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, op, ": eps must be positive and finite, got ",
                    py_float_repr(eps));
}

static int64_t features(const at::Tensor& t) {  // prod of all sizes but the first
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

static void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating tensor (float16, bfloat16, float32, float64), got ",
                   dtype_name(t.scalar_type()));
}

// First of every check: an index tensor on another device (meta included) would be read as the
// wrong kind of memory.
static void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                         const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

static void check_int64(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
                   dtype_name(t.scalar_type()));
}

// target [B, *T] matches y [2, K, B, *T] in dtype and shape (`layout` names the shape).
static void check_target(const at::Tensor& y, const at::Tensor& target, const char* op, const char* layout) {
  TORCH_CHECK_TYPE(target.scalar_type() == y.scalar_type(), op, ": target dtype ",
                   dtype_name(target.scalar_type()), " does not match y dtype ", dtype_name(y.scalar_type()));
  TORCH_CHECK_VALUE(target.sizes() == y.sizes().slice(2), op, ": target must be ", layout, " = ",
                    y.sizes().slice(2), " to match y of shape ", y.sizes(), ", got shape ", target.sizes());
}

void check_perturb_args(const at::Tensor& a, const at::Tensor& colors, const at::Tensor& probe_ids,
                        double eps) {
  const char* op = "hzo_ext::perturb";
  check_device(colors, a, op, "colors", "a");
  check_device(probe_ids, a, op, "probe_ids", "a");
  check_eps(eps, op);
  check_floating(a, op, "a");
  TORCH_CHECK_VALUE(a.dim() >= 2, op, ": a must be [B, *S] with at least one feature dimension, got shape ",
                    a.sizes());
  check_int64(colors, op, "colors");
  check_int64(probe_ids, op, "probe_ids");
  const int64_t n = features(a);
  TORCH_CHECK_VALUE(colors.dim() == 1 && colors.numel() == n, op,
                    ": colors must be 1-D with prod(S) = ", n, " entries for a of shape ", a.sizes(),
                    ", got shape ", colors.sizes());
  TORCH_CHECK_VALUE(probe_ids.dim() == 1, op, ": probe_ids must be 1-D [K], got shape ", probe_ids.sizes());
  if (colors.numel() > 0) {
    TORCH_CHECK_VALUE(colors.min().item<int64_t>() >= 0, op, ": colors must be >= 0 (out of range)");
  }
  if (probe_ids.numel() > 0) {
    TORCH_CHECK_VALUE(probe_ids.min().item<int64_t>() >= 0, op, ": probe_ids must be >= 0 (out of range)");
  }
}

int64_t check_contract_args(const at::Tensor& y, const at::Tensor& target, const at::Tensor& owner,
                            double eps, std::optional<int64_t> num_inputs) {
  const char* op = num_inputs ? "hzo_ext::contract_sized" : "hzo_ext::contract";
  check_device(target, y, op, "target", "y");
  check_device(owner, y, op, "owner", "y");
  check_eps(eps, op);
  check_floating(y, op, "y");
  TORCH_CHECK_VALUE(y.dim() >= 4 && y.size(0) == 2, op,
                    ": y must be [2, K, B, *T] (the +eps and -eps outputs), got shape ", y.sizes());
  check_target(y, target, op, "[B, *T]");
  check_int64(owner, op, "owner");
  const int64_t K = y.size(1);
  const int64_t Q = features(target);
  TORCH_CHECK_VALUE(owner.dim() == 2 && owner.size(0) == K && owner.size(1) == Q, op,
                    ": owner must be [K, prod(T)] = [", K, ", ", Q, "], got shape ", owner.sizes());
  if (num_inputs) {
    TORCH_CHECK_VALUE(*num_inputs >= 0, op, ": num_inputs must be >= 0, got ", *num_inputs);
  }
  int64_t lo = -1, hi = -1;
  if (owner.numel() > 0) {
    auto [mn, mx] = at::aminmax(owner);
    lo = mn.item<int64_t>();
    hi = mx.item<int64_t>();
  }
  TORCH_CHECK_VALUE(lo >= -1, op, ": owner entries must be >= -1 (-1 = ignored), found ", lo, " (out of range)");
  if (!num_inputs) return hi + 1;
  TORCH_CHECK_VALUE(hi < *num_inputs, op, ": owner entries must be < num_inputs = ", *num_inputs, ", found ",
                    hi, " (out of range)");
  return *num_inputs;
}

ContractSppArgs prepare_contract_spp(const at::Tensor& y, const at::Tensor& target, const at::Tensor& colors,
                                     int64_t probe_start, const at::Tensor& boxes, at::IntArrayRef in_shape,
                                     bool channelwise, double eps) {
  const char* op = "hzo_ext::contract_spp";
  check_device(target, y, op, "target", "y");
  check_device(colors, y, op, "colors", "y");
  check_device(boxes, y, op, "boxes", "y");
  check_eps(eps, op);
  check_floating(y, op, "y");
  const int64_t r = static_cast<int64_t>(in_shape.size()) - 1;
  TORCH_CHECK_VALUE(r >= 1 && r <= 3, op, ": in_shape must be [C, *S] with 1 to 3 spatial axes, got ",
                    in_shape);
  for (auto n : in_shape) TORCH_CHECK_VALUE(n > 0, op, ": in_shape sizes must be positive, got ", in_shape);
  TORCH_CHECK_VALUE(y.dim() == 4 + r && y.size(0) == 2, op, ": y must be [2, K, B, Cout, *T] with ", r,
                    " spatial axes (the +eps and -eps outputs), got shape ", y.sizes());
  check_target(y, target, op, "[B, Cout, *T]");
  TORCH_CHECK_VALUE(probe_start >= 0, op, ": probe_start must be >= 0, got ", probe_start);
  check_int64(colors, op, "colors");
  check_int64(boxes, op, "boxes");
  BoxGeometry g;
  g.rank = static_cast<int>(r);
  g.C = in_shape[0];
  g.Cout = y.size(3);
  g.channelwise = channelwise;
  int64_t positions = 0;
  for (int64_t a = 0; a < r; ++a) {
    const int64_t slot = 3 - r + a;
    g.S[slot] = in_shape[1 + a];
    g.T[slot] = y.size(4 + a);
    g.axis_offset[slot] = positions;
    positions += g.S[slot];
  }
  TORCH_CHECK_VALUE(colors.dim() == 1 && colors.numel() == g.C * g.in_spatial(), op,
                    ": colors must be 1-D with prod(in_shape) = ", g.C * g.in_spatial(), " entries, got shape ",
                    colors.sizes());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(0) == 2 && boxes.size(1) == positions, op,
                    ": boxes must be [2, sum(S)] = [2, ", positions,
                    "] (lo and hi per input position of each axis), got shape ", boxes.sizes());
  TORCH_CHECK_VALUE(!channelwise || g.Cout == g.C, op, ": channelwise needs as many output channels as input "
                    "channels, got ", g.Cout, " and ", g.C);
  // Every non-empty box must lie inside its axis: the kernels index y with it.
  std::vector<int64_t> limits;
  for (int64_t a = 0; a < r; ++a) limits.insert(limits.end(), in_shape[1 + a], y.size(4 + a));
  const auto limit = at::tensor(limits, boxes.options());
  const auto lo = boxes[0], hi = boxes[1];
  const bool outside = ((lo <= hi) & ((lo < 0) | (hi >= limit))).any().item<bool>();
  TORCH_CHECK_VALUE(!outside, op, ": boxes hold an interval outside the output axis (out of range)");
  ContractSppArgs args{y.contiguous(), target.contiguous(), colors.contiguous(), boxes.contiguous(), g};
  args.g.lo = args.boxes.data_ptr<int64_t>();
  args.g.hi = args.g.lo + args.boxes.size(1);
  return args;
}

static void check_act(int64_t act, const char* op) {
  TORCH_CHECK_VALUE(act >= 0 && act < static_cast<int64_t>(Act::kCount), op, ": act must be a code in [0, ",
                    static_cast<int64_t>(Act::kCount), "), got ", act);
}

// other matches z in dtype (`name` names it).
static void check_same_dtype(const at::Tensor& other, const at::Tensor& z, const char* op, const char* name) {
  TORCH_CHECK_TYPE(other.scalar_type() == z.scalar_type(), op, ": ", name, " dtype ",
                   dtype_name(other.scalar_type()), " does not match z dtype ", dtype_name(z.scalar_type()));
}

void check_probe_elementwise_args(const at::Tensor& z, const at::Tensor& target, double eps, int64_t act) {
  const char* op = "hzo_ext::probe_elementwise";
  check_device(target, z, op, "target", "z");
  check_eps(eps, op);
  check_act(act, op);
  check_floating(z, op, "z");
  check_same_dtype(target, z, op, "target");
  TORCH_CHECK_VALUE(target.sizes() == z.sizes(), op, ": target must have the shape of z, ", z.sizes(),
                    ", got shape ", target.sizes());
}

// The checks shared by the fused probes of a layer with a weight (probe_linear, probe_conv2d).
static void check_weighted_probe(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& target, double eps,
                                 int64_t act, const char* op) {
  check_device(weight, z, op, "weight", "z");
  check_device(target, z, op, "target", "z");
  check_eps(eps, op);
  check_act(act, op);
  check_floating(z, op, "z");
  check_same_dtype(weight, z, op, "weight");
  check_same_dtype(target, z, op, "target");
}

void check_probe_linear_args(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& target, double eps,
                             int64_t act) {
  const char* op = "hzo_ext::probe_linear";
  check_weighted_probe(z, weight, target, eps, act, op);
  TORCH_CHECK_VALUE(z.dim() == 2, op, ": z must be [B, Q], got shape ", z.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == z.size(1), op, ": weight must be [Q, K] with Q = ",
                    z.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK_VALUE(target.sizes() == z.sizes(), op, ": target must have the shape of z, ", z.sizes(),
                    ", got shape ", target.sizes());
}

ConvGeometry check_probe_conv2d_args(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& target,
                                     at::IntArrayRef in_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups, double eps, int64_t act) {
  const char* op = "hzo_ext::probe_conv2d";
  check_weighted_probe(z, weight, target, eps, act, op);
  TORCH_CHECK_VALUE(z.dim() == 4, op, ": z must be [B, Cout, Ho, Wo], got shape ", z.sizes());
  TORCH_CHECK_VALUE(target.sizes() == z.sizes(), op, ": target must have the shape of z, ", z.sizes(),
                    ", got shape ", target.sizes());
  TORCH_CHECK_VALUE(in_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": in_size, stride, padding and dilation must have 2 entries each");
  TORCH_CHECK_VALUE(groups >= 1 && weight.dim() == 4 && weight.size(0) == z.size(1) && z.size(1) % groups == 0, op,
                    ": weight must be [Cout, Cin / groups, KH, KW] with Cout = ", z.size(1),
                    " divisible by groups = ", groups, ", got shape ", weight.sizes());
  ConvGeometry g;
  g.B = z.size(0);
  g.Cout = z.size(1);
  g.Cin = weight.size(1) * groups;
  g.H = in_size[0];
  g.W = in_size[1];
  g.Ho = z.size(2);
  g.Wo = z.size(3);
  g.KH = weight.size(2);
  g.KW = weight.size(3);
  g.groups = groups;
  for (int a = 0; a < 2; ++a) {
    TORCH_CHECK_VALUE(stride[a] >= 1 && dilation[a] >= 1 && padding[a] >= 0 && in_size[a] >= 1, op,
                      ": stride and dilation must be >= 1, padding >= 0, in_size >= 1");
    g.stride[a] = stride[a];
    g.padding[a] = padding[a];
    g.dilation[a] = dilation[a];
    const int64_t k = a == 0 ? g.KH : g.KW, out = a == 0 ? g.Ho : g.Wo;
    const int64_t expect = (in_size[a] + 2 * padding[a] - dilation[a] * (k - 1) - 1) / stride[a] + 1;
    TORCH_CHECK_VALUE(out == expect, op, ": z's spatial size ", z.sizes().slice(2), " is not that of a conv of ",
                      in_size, " (expected ", expect, " on axis ", a, ")");
  }
  return g;
}

OwnerCsr owner_csr(const at::Tensor& owner, int64_t num_inputs) {
  auto flat = owner.reshape({-1});
  auto sorted = flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto values = std::get<0>(sorted);
  auto boundaries = at::arange(num_inputs + 1, flat.options());
  return {std::get<1>(sorted).contiguous(), at::searchsorted(values, boundaries).contiguous()};
}

}  // namespace hzo
