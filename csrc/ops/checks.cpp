#include "checks.h"

#include <cmath>
#include <vector>

namespace hzo {

void check_eps(double eps, const char* op) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be positive and finite, got ", eps);
}

static int64_t features(const at::Tensor& t) {  // prod of all sizes but the first
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

static void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating tensor (float16, bfloat16, float32, float64), got ", t.scalar_type());
}

static void check_index(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                        const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

void check_perturb_args(const at::Tensor& a, const at::Tensor& colors, const at::Tensor& probe_ids,
                        double eps) {
  const char* op = "hzo_ext::perturb";
  check_eps(eps, op);
  check_floating(a, op, "a");
  TORCH_CHECK(a.dim() >= 2, op, ": a must be [B, *S] with at least one feature dimension, got shape ",
              a.sizes());
  check_index(colors, a, op, "colors", "a");
  check_index(probe_ids, a, op, "probe_ids", "a");
  const int64_t n = features(a);
  TORCH_CHECK(colors.dim() == 1 && colors.numel() == n, op,
              ": colors must be 1-D with prod(S) = ", n, " entries for a of shape ", a.sizes(),
              ", got shape ", colors.sizes());
  TORCH_CHECK(probe_ids.dim() == 1, op, ": probe_ids must be 1-D [K], got shape ", probe_ids.sizes());
  if (colors.numel() > 0) {
    TORCH_CHECK(colors.min().item<int64_t>() >= 0, op, ": colors must be >= 0 (out of range)");
  }
  if (probe_ids.numel() > 0) {
    TORCH_CHECK(probe_ids.min().item<int64_t>() >= 0, op, ": probe_ids must be >= 0 (out of range)");
  }
}

int64_t check_contract_args(const at::Tensor& y, const at::Tensor& target, const at::Tensor& owner,
                            double eps, std::optional<int64_t> num_inputs) {
  const char* op = num_inputs ? "hzo_ext::contract_sized" : "hzo_ext::contract";
  check_eps(eps, op);
  check_floating(y, op, "y");
  TORCH_CHECK(y.dim() >= 4 && y.size(0) == 2, op,
              ": y must be [2, K, B, *T] (the +eps and -eps outputs), got shape ", y.sizes());
  TORCH_CHECK(target.device() == y.device(), op, ": target is on ", target.device(), " but y is on ",
              y.device());
  TORCH_CHECK(target.scalar_type() == y.scalar_type(), op, ": target dtype ", target.scalar_type(),
              " does not match y dtype ", y.scalar_type());
  TORCH_CHECK(target.dim() == y.dim() - 2 && target.sizes() == y.sizes().slice(2), op,
              ": target must be [B, *T] = ", y.sizes().slice(2), " to match y of shape ", y.sizes(),
              ", got shape ", target.sizes());
  check_index(owner, y, op, "owner", "y");
  const int64_t K = y.size(1);
  const int64_t Q = features(target);
  TORCH_CHECK(owner.dim() == 2 && owner.size(0) == K && owner.size(1) == Q, op,
              ": owner must be [K, prod(T)] = [", K, ", ", Q, "], got shape ", owner.sizes());
  int64_t lo = -1, hi = -1;
  if (owner.numel() > 0) {
    auto [mn, mx] = at::aminmax(owner);
    lo = mn.item<int64_t>();
    hi = mx.item<int64_t>();
  }
  TORCH_CHECK(lo >= -1, op, ": owner entries must be >= -1 (-1 = ignored), found ", lo, " (out of range)");
  if (!num_inputs) return hi + 1;
  TORCH_CHECK(*num_inputs >= 0, op, ": num_inputs must be >= 0, got ", *num_inputs);
  TORCH_CHECK(hi < *num_inputs, op, ": owner entries must be < num_inputs = ", *num_inputs, ", found ", hi,
              " (out of range)");
  return *num_inputs;
}

ContractSppArgs prepare_contract_spp(const at::Tensor& y, const at::Tensor& target, const at::Tensor& colors,
                                     int64_t probe_start, const at::Tensor& boxes, at::IntArrayRef in_shape,
                                     bool channelwise, double eps) {
  const char* op = "hzo_ext::contract_spp";
  check_eps(eps, op);
  check_floating(y, op, "y");
  const int64_t r = static_cast<int64_t>(in_shape.size()) - 1;
  TORCH_CHECK(r >= 1 && r <= 3, op, ": in_shape must be [C, *S] with 1 to 3 spatial axes, got ", in_shape);
  for (auto n : in_shape) TORCH_CHECK(n > 0, op, ": in_shape sizes must be positive, got ", in_shape);
  TORCH_CHECK(y.dim() == 4 + r && y.size(0) == 2, op, ": y must be [2, K, B, Cout, *T] with ", r,
              " spatial axes (the +eps and -eps outputs), got shape ", y.sizes());
  TORCH_CHECK(target.device() == y.device(), op, ": target is on ", target.device(), " but y is on ",
              y.device());
  TORCH_CHECK(target.scalar_type() == y.scalar_type(), op, ": target dtype ", target.scalar_type(),
              " does not match y dtype ", y.scalar_type());
  TORCH_CHECK(target.sizes() == y.sizes().slice(2), op, ": target must be [B, Cout, *T] = ", y.sizes().slice(2),
              " to match y of shape ", y.sizes(), ", got shape ", target.sizes());
  TORCH_CHECK(probe_start >= 0, op, ": probe_start must be >= 0, got ", probe_start);
  check_index(colors, y, op, "colors", "y");
  check_index(boxes, y, op, "boxes", "y");
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
  TORCH_CHECK(colors.dim() == 1 && colors.numel() == g.C * g.in_spatial(), op,
              ": colors must be 1-D with prod(in_shape) = ", g.C * g.in_spatial(), " entries, got shape ",
              colors.sizes());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == 2 && boxes.size(1) == positions, op,
              ": boxes must be [2, sum(S)] = [2, ", positions, "] (lo and hi per input position of each axis), "
              "got shape ", boxes.sizes());
  TORCH_CHECK(!channelwise || g.Cout == g.C, op, ": channelwise needs as many output channels as input "
              "channels, got ", g.Cout, " and ", g.C);
  // Every non-empty box must lie inside its axis: the kernels index y with it.
  std::vector<int64_t> limits;
  for (int64_t a = 0; a < r; ++a) limits.insert(limits.end(), in_shape[1 + a], y.size(4 + a));
  const auto limit = at::tensor(limits, boxes.options());
  const auto lo = boxes[0], hi = boxes[1];
  const bool outside = ((lo <= hi) & ((lo < 0) | (hi >= limit))).any().item<bool>();
  TORCH_CHECK(!outside, op, ": boxes hold an interval outside the output axis (out of range)");
  ContractSppArgs args{y.contiguous(), target.contiguous(), colors.contiguous(), boxes.contiguous(), g};
  args.g.lo = args.boxes.data_ptr<int64_t>();
  args.g.hi = args.g.lo + args.boxes.size(1);
  return args;
}

OwnerCsr owner_csr(const at::Tensor& owner, int64_t num_inputs) {
  auto flat = owner.reshape({-1});
  auto sorted = flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto values = std::get<0>(sorted);
  auto boundaries = at::arange(num_inputs + 1, flat.options());
  return {std::get<1>(sorted).contiguous(), at::searchsorted(values, boundaries).contiguous()};
}

}  // namespace hzo
