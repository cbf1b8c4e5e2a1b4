// One HZO estimate in C++ (docs/executor.md). The order of operations and the ops themselves
// are those of the Python path (hzo_ext/estimator.py: _clean_forward, _loss_head, _run_plan,
// probe_targets, _leaves), so the targets delta_l agree bit for bit; only the leaves (explicit
// VJPs or one autograd call for all stages, instead of one autograd call per stage) may round
// differently. fast=True gives that agreement up for less work (folding, stacked levels).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <string>

#include "executor.h"
#include "nvtx.h"

namespace hzo::exec {

// The ops are called below the Autograd dispatch key: their autograd formulas are registered
// from Python (hzo_ext/ops.py), and the executors never differentiate through them.
at::Tensor perturb_op(const at::Tensor& a, const at::Tensor& colors, const at::Tensor& ids, double eps) {
  at::AutoDispatchBelowAutograd below_autograd;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hzo_ext::perturb", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(a, colors, ids, eps);
}

namespace {

at::Tensor contract_sized_op(const at::Tensor& y, const at::Tensor& target, const at::Tensor& owner, double eps,
                             int64_t num_inputs) {
  at::AutoDispatchBelowAutograd below_autograd;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hzo_ext::contract_sized", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t)>();
  return op.call(y, target, owner, eps, num_inputs);
}

at::Tensor contract_spp_op(const at::Tensor& y, const at::Tensor& target, const at::Tensor& colors,
                           int64_t probe_start, const at::Tensor& boxes, at::IntArrayRef in_shape, bool channelwise,
                           double eps) {
  at::AutoDispatchBelowAutograd below_autograd;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hzo_ext::contract_spp", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                               const at::Tensor&, at::IntArrayRef, bool, double)>();
  return op.call(y, target, colors, probe_start, boxes, in_shape, channelwise, eps);
}

#ifdef HZO_WITH_CUDA
// NVTX name of one phase of a split: hzo/split<i>-<m>-<j>/<part>.
std::string split_range(const SplitPlan& s, const char* part) {
  return "hzo/split" + std::to_string(s.i) + "-" + std::to_string(s.m) + "-" + std::to_string(s.j) + "/" + part;
}
#endif

// [B, *S] -> [B * n, *S] view dims of `a` with the first replaced by -1.
std::vector<int64_t> rows_shape(const at::Tensor& a) {
  std::vector<int64_t> s(a.sizes().begin(), a.sizes().end());
  s[0] = -1;
  return s;
}

// [N, *T] outputs of 2K copies of a batch of B -> [2, K, B, *T].
std::vector<int64_t> copies_shape(const at::Tensor& out, int64_t K, int64_t B) {
  std::vector<int64_t> s{2, K, B};
  s.insert(s.end(), out.sizes().begin() + 1, out.sizes().end());
  return s;
}

// The +-eps copies of a right sub-network's first node, folded (fast mode): the copies of a_m
// move coordinate start + k by d[side, k, b] = fl(a +- eps) - a, the step perturb applies, so
//   Linear:          W (a +- d e_k) + b = (W a + b) +- d W[:, k]   (one addcmul, no matmul)
//   identity skip:   a +- d e_k         = a, then +-d added on the moved coordinates
// and the copies themselves are never built. `d` is [2, K, B, 1]; returns [2KB, *].
at::Tensor run_folded(const Node& node, const at::Tensor& a, int64_t start, const at::Tensor& d, RunCounts& run) {
  const int64_t K = d.size(1), B = a.size(0);
  switch (node.kind) {
    case Kind::Linear: {
      const auto& W = node.tensors[0];
      const at::Tensor base = at::linear(a, W, as_optional(node.tensors[1]));  // [B, O]
      const int64_t O = W.size(0);
      run.folded_flops += 2 * (2 * K * B) * W.size(1) * O;
      // [1, K, 1, O]: W[:, k], contiguous (a strided column would keep addcmul from vectorizing)
      const at::Tensor cols = W.t().narrow(0, start, K).contiguous().unsqueeze(0).unsqueeze(2);
      at::Tensor out = at::empty({2, K, B, O}, base.options());  // row-major, whatever the inputs' strides
      at::addcmul_out(out, base.view({1, 1, B, O}), d, cols);
      return out.view({2 * K * B, O});
    }
    case Kind::Sequential: {
      at::Tensor z = run_folded(node.children[0], a, start, d, run);
      for (size_t c = 1; c < node.children.size(); ++c) z = node.children[c].forward(z, run);
      return z;
    }
    case Kind::Residual: {
      at::Tensor branch = run_folded(node.children[0], a, start, d, run);  // a fresh tensor
      if (node.has_shortcut) return run_folded(node.children[1], a, start, d, run) + branch;
      const int64_t n = a.size(1);
      at::Tensor out = branch.view({2, K, B, n}).add_(a.view({1, 1, B, n}));
      out.narrow(3, start, K).diagonal(0, 1, 3).add_(d.view({2, K, B}).permute({0, 2, 1}));
      return branch;
    }
    default:
      TORCH_CHECK(false, "hzo executor: folding a node that does not start with a Linear");
  }
}

// Output features of the Linear a foldable node starts with.
int64_t first_linear_outputs(const Node& node) {
  return node.kind == Kind::Linear ? node.tensors[0].size(0) : first_linear_outputs(node.children[0]);
}

// fast mode: fold when the skipped matmul has at least this many multiply-adds (below, the
// extra small ops of folding cost more than the matmul), stack a split whose widest query
// tensor has fewer elements than kStackBelow (overhead-bound: one op for the whole group).
constexpr int64_t kFoldPays = int64_t{1} << 20;
constexpr int64_t kStackBelow = int64_t{1} << 16;

// S same-structured nodes (Node::stackable_with) run as one on x [S, rows, features]: Linear
// as a batched matmul with the S weights stacked, elementwise nodes on the stacked tensor.
struct Stacked {
  const Node* proto = nullptr;
  at::Tensor weight_t;  // Linear: [S, in, out]
  at::Tensor bias;      // Linear: [S, 1, out] or undefined
  std::vector<Stacked> children;

  explicit Stacked(const std::vector<const Node*>& nodes) : proto(nodes[0]) {
    if (proto->kind == Kind::Linear) {
      std::vector<at::Tensor> w, b;
      for (const Node* n : nodes) {
        w.push_back(n->tensors[0].t());
        if (n->tensors[1].defined()) b.push_back(n->tensors[1]);
      }
      weight_t = at::stack(w);
      if (!b.empty()) bias = at::stack(b).unsqueeze(1);
    }
    for (size_t c = 0; c < proto->children.size(); ++c) {
      std::vector<const Node*> kids;
      for (const Node* n : nodes) kids.push_back(&n->children[c]);
      children.emplace_back(kids);
    }
  }

  at::Tensor forward(const at::Tensor& x, RunCounts& run) const {
    switch (proto->kind) {
      case Kind::Linear: {
        if (!run.workspace) return bias.defined() ? at::baddbmm(bias, x, weight_t) : at::bmm(x, weight_t);
        at::Tensor out = run.workspace->empty({x.size(0), x.size(1), weight_t.size(2)}, x.options());
        return bias.defined() ? at::baddbmm_out(out, bias, x, weight_t) : at::bmm_out(out, x, weight_t);
      }
      case Kind::Sequential: {
        at::Tensor z = x;
        for (const auto& c : children) z = c.forward(z, run);
        return z;
      }
      case Kind::Residual: {
        at::Tensor skip = proto->has_shortcut ? children[1].forward(x, run) : x;
        return residual_sum(skip, children[0].forward(x, run), run);
      }
      default:  // elementwise, the same hyperparameters for all S
        return proto->compute(x, run);
    }
  }
};

// True when every tensor is finite; one device sync for all of them.
bool all_finite(const std::vector<at::Tensor>& ts) {
  if (ts.empty()) return true;
  std::vector<at::Tensor> flat;
  flat.reserve(ts.size());
  for (const auto& t : ts) flat.push_back(t.reshape({-1}));
  return at::isfinite(at::cat(flat)).all().item<bool>();
}

}  // namespace

at::Tensor Workspace::empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  const int64_t n = c10::multiply_integers(shape);
  at::Tensor* best = nullptr;
  for (auto& b : buffers_) {
    const bool fits = b.storage().use_count() == 1 && b.numel() >= n && b.dtype() == options.dtype() &&
                      b.device() == options.device();
    if (fits && (!best || b.numel() < best->numel())) best = &b;
  }
  if (!best) {
    if (buffers_.size() >= kMaxBuffers) return at::empty(shape, options);
    buffers_.push_back(at::empty({n}, options));
    best = &buffers_.back();
  }
  return best->narrow(0, 0, n).view(shape);
}

bool Workspace::owns(const c10::Storage& storage) const {
  for (const auto& b : buffers_) {
    if (b.storage().is_alias_of(storage)) return true;
  }
  return false;
}

std::vector<Chunk> make_chunks(int64_t num_probes, std::optional<int64_t> chunk_size, const at::Device& device,
                               bool dense_owners, int64_t num_outputs) {
  const int64_t chunk = chunk_size ? *chunk_size : num_probes;
  TORCH_CHECK(chunk > 0, "hzo executor: chunk size must be positive");
  constexpr int64_t kKeepDenseOwner = int64_t{1} << 20;  // entries (8 MiB): else built per use
  std::vector<Chunk> chunks;
  for (int64_t start = 0; start < num_probes; start += chunk) {
    Chunk c;
    c.start = start;
    c.ids = at::arange(start, std::min(num_probes, start + chunk), at::TensorOptions().dtype(at::kLong).device(device));
    if (dense_owners && c.ids.numel() * num_outputs <= kKeepDenseOwner) {
      c.owner = dense_owner(c.ids, num_outputs);
    }
    chunks.push_back(std::move(c));
  }
  return chunks;
}

at::Tensor dense_owner(const at::Tensor& ids, int64_t num_outputs) {
  return ids.reshape({-1, 1}).expand({-1, num_outputs}).contiguous();
}

at::Tensor contract_chunk(const Chunk& c, const SppGeometry* spp, const at::Tensor& y, const at::Tensor& target,
                          double eps, int64_t num_inputs) {
  if (spp) {  // as SpatialColoring.contract: outputs seen in the geometry's [C', *T]
    const int64_t per_sample = c10::multiply_integers(spp->geometry_out);
    TORCH_CHECK(y.numel() == y.size(0) * y.size(1) * y.size(2) * per_sample, "SPP: the sub-network gave ",
                y.sizes().slice(3), " outputs per sample, the geometry predicts ", spp->geometry_out);
    std::vector<int64_t> y_shape{y.size(0), y.size(1), y.size(2)}, t_shape{target.size(0)};
    y_shape.insert(y_shape.end(), spp->geometry_out.begin(), spp->geometry_out.end());
    t_shape.insert(t_shape.end(), spp->geometry_out.begin(), spp->geometry_out.end());
    return contract_spp_op(y.reshape(y_shape), target.reshape(t_shape), spp->colors, c.start, spp->boxes,
                           spp->in_shape, spp->channelwise, eps);
  }
  const at::Tensor owner =
      c.owner.defined() ? c.owner : dense_owner(c.ids, target.numel() / std::max<int64_t>(target.size(0), 1));
  return contract_sized_op(y, target, owner, eps, num_inputs);
}

Executor::Executor(std::vector<Node> stages, std::vector<std::vector<at::Tensor>> stage_params, LossSpec loss,
                   Options options)
    : stages_(std::move(stages)), params_(std::move(stage_params)), loss_(std::move(loss)), options_(options) {
  TORCH_CHECK(params_.size() == stages_.size(), "hzo executor: one parameter list per stage expected");
  for (const auto& n : stages_) {
    python_.push_back(n.calls_python());
    explicit_.push_back(n.explicit_vjp());
  }
}

double Executor::step(const at::Tensor& a) const {
  if (!options_.relative) return options_.eps;
  const double rms = a.to(at::kDouble).pow(2).mean().sqrt().item<double>();
  return rms > 0 && std::isfinite(rms) ? options_.eps * rms : options_.eps;
}

void Executor::release() {
  acts_.clear();
  local_.clear();
  tapes_.clear();
  estimate_range_.end();
}

std::vector<at::Tensor> Executor::forward(const at::Tensor& x) {
  release();
  estimate_range_.start("hzo/estimate");
  HZO_NVTX(range, "hzo/forward");
  widest_.assign(stages_.size(), 0);
  tapes_.assign(stages_.size(), {});
  taped_.assign(stages_.size(), false);
  forward_calls_ = 0;
  const int64_t B = x.size(0);
  acts_.push_back(x.detach());
  local_.emplace_back();
  for (size_t l = 0; l < stages_.size(); ++l) {
    bool needs_vjp = false;
    for (const auto& p : params_[l]) needs_vjp = needs_vjp || p.requires_grad();
    at::Tensor out;
    RunCounts run;
    run.fast = options_.fast;
    // The leaf's local graph: a tape for Node::backward, else autograd (input detached).
    const bool taped = taped_[l] = needs_vjp && explicit_[l];
    if (taped) run.tape = &tapes_[l];
    {
      at::AutoGradMode grad_mode(needs_vjp && !taped);
      out = stages_[l].forward(acts_.back(), run);
    }
    forward_calls_ += run.python_calls;
    widest_[l] = run.widest;
    TORCH_CHECK(out.dim() >= 2 && out.size(0) == B, "hzo executor: stage ", l + 1, " maps a batch of ", B,
                " to shape ", out.sizes());
    acts_.push_back(out.detach());
    local_.push_back(needs_vjp && out.requires_grad() ? out : at::Tensor());
  }
  // The caller reruns the Python path to name the stage.
  TORCH_CHECK(all_finite({acts_.begin() + 1, acts_.end()}), "hzo executor: non-finite value in the clean forward");
  return acts_;
}

at::Tensor Executor::run_range(int64_t m, int64_t j, at::Tensor z, RunCounts& run) const {
  for (int64_t l = m; l < j; ++l) z = stages_[l].forward(z, run);
  return z;
}

at::Tensor Executor::query_chunk(const SplitPlan& s, const Chunk& c, const at::Tensor& a, double eps,
                                 RunCounts& run) const {
  const Node& first = stages_[s.m];
  const int64_t K = c.ids.numel();
  run.reuse = true;  // the query's intermediates are its own
  run.fast = options_.fast;
  if (options_.fast && s.dense && a.dim() == 2 && first.foldable() &&
      2 * K * a.numel() * first_linear_outputs(first) >= kFoldPays) {
    HZO_NVTX(r, split_range(s, "query"));
    const at::Tensor sel = a.narrow(1, c.start, K);  // [B, K]: the coordinates this chunk moves
    const at::Tensor d = at::stack({(sel + eps) - sel, (sel - eps) - sel}).transpose(1, 2).unsqueeze(-1).contiguous();
    at::Tensor z = run_folded(first, a, c.start, d, run);
    ++run.folded;
    return run_range(s.m + 1, s.j, std::move(z), run);
  }
  at::Tensor copies;
  {
    HZO_NVTX(r, split_range(s, "perturb"));
    copies = perturb_op(a, s.colors, c.ids, eps).reshape(rows_shape(a));  // [2KB, *S]
  }
  HZO_NVTX(r, split_range(s, "query"));
  return run_range(s.m, s.j, std::move(copies), run);
}

at::Tensor Executor::probe_split(const SplitPlan& s, const at::Tensor& target, RunCounts& run) const {
  const at::Tensor& a = acts_[s.m];
  const double eps = step(a);
  const int64_t B = a.size(0);
  at::Tensor delta;
  for (const auto& c : s.chunks) {
    const at::Tensor out = query_chunk(s, c, a, eps, run);
    HZO_NVTX(r, split_range(s, "contract"));
    const at::Tensor y = out.reshape(copies_shape(out, c.ids.numel(), B));
    const at::Tensor part = contract_chunk(c, s.spp ? &*s.spp : nullptr, y, target, eps, s.num_inputs);
    delta = delta.defined() ? delta + part : part;
  }
  return delta.reshape(a.sizes());
}

at::Tensor Executor::loss_head(const Plan& plan, const at::Tensor& y, const LossCallback& per_sample_loss,
                               std::vector<at::Tensor>& checked, Outcome& outcome) const {
  HZO_NVTX(range, "hzo/head");
  const at::Tensor& z = acts_.back();
  const int64_t B = z.size(0);
  const double eps = step(z);
  const at::Tensor ones = at::ones({B, 1}, z.options());
  // The reduction's scale (stages.py LossHead._scale), from the real batch.
  at::Tensor scale_t;
  const bool class_targets = loss_.kind == LossKind::CrossEntropy && y.scalar_type() == at::kLong;
  if (loss_.reduction == at::Reduction::Mean && class_targets) {
    const at::Tensor keep = y.ne(loss_.ignore_index);
    const at::Tensor wy = loss_.weight.defined()
                              ? loss_.weight.to(z.scalar_type()).index({y.clamp_min(0)}) * keep
                              : keep.to(z.scalar_type());
    scale_t = wy.sum().reciprocal();  // Python's 1.0 / t is t.reciprocal() * 1.0
  }
  std::vector<int64_t> reps(static_cast<size_t>(y.dim()), 1);
  at::Tensor delta;
  for (const auto& c : plan.head_chunks) {
    const int64_t K = c.ids.numel(), n = 2 * K;
    const at::Tensor copies = perturb_op(z, plan.head_colors, c.ids, eps).reshape(rows_shape(z));
    at::Tensor out;
    if (per_sample_loss) {
      out = per_sample_loss(copies, n);  // checks finiteness and counts loss_evals itself
    } else {
      reps[0] = n;
      const at::Tensor ys = y.repeat(reps);
      const at::Tensor raw = loss_.kind == LossKind::CrossEntropy
                                 ? at::cross_entropy_loss(copies, ys, as_optional(loss_.weight),
                                                          at::Reduction::None, loss_.ignore_index,
                                                          loss_.label_smoothing)
                                 : at::mse_loss(copies, ys, at::Reduction::None);
      out = raw.reshape({raw.size(0), -1}).sum(1);
      if (scale_t.defined()) {
        out = out * scale_t;
      } else if (loss_.reduction == at::Reduction::Mean) {  // Python: 1.0 / numel of the real batch's terms
        out = out * (1.0 / static_cast<double>(B * (raw.numel() / raw.size(0))));
      }
      checked.push_back(out);
      outcome.loss_evals += n;
      out = out.unsqueeze(1);
    }
    const at::Tensor part = contract_chunk(c, nullptr, out.reshape({2, K, B, 1}), ones, eps, plan.head_inputs);
    delta = delta.defined() ? delta + part : part;
  }
  return delta.reshape(z.sizes());
}

bool Executor::single_threaded(const SplitPlan& s) const {
  // The queries' widest tensor, from the clean forward's per-sample widths.
  const at::Tensor& a = acts_[s.m];
  int64_t width = a.numel() / std::max<int64_t>(a.size(0), 1);
  for (int64_t l = s.m; l < s.j; ++l) {
    if (python_[l]) return false;
    width = std::max(width, widest_[l]);
  }
  int64_t chunk = 0;
  for (const auto& c : s.chunks) chunk = std::max(chunk, c.ids.numel());
  return a.is_cpu() && 2 * chunk * a.size(0) * width < at::internal::GRAIN_SIZE;
}

bool Executor::stackable(const SplitPlan& a, const SplitPlan& b) const {
  const at::Tensor& x = acts_[a.m];
  const at::Tensor& y = acts_[b.m];
  if (!a.dense || !b.dense || a.j - a.m != b.j - b.m || x.dim() != 2 || x.sizes() != y.sizes() ||
      a.probes != b.probes) {
    return false;
  }
  int64_t width = x.size(1), chunk = 0;
  for (int64_t l = 0; l < a.j - a.m; ++l) {
    if (!stages_[a.m + l].stackable_with(stages_[b.m + l])) return false;
    width = std::max({width, widest_[a.m + l], widest_[b.m + l]});
  }
  for (const auto& c : a.chunks) chunk = std::max(chunk, c.ids.numel());
  return 2 * chunk * x.size(0) * width < kStackBelow;
}

void Executor::run_stacked(const std::vector<const SplitPlan*>& group, std::vector<at::Tensor>& deltas,
                           RunCounts& run) const {
  const int64_t S = static_cast<int64_t>(group.size());
  const SplitPlan& s0 = *group[0];
  const int64_t B = acts_[s0.m].size(0), n = acts_[s0.m].size(1);
  run.reuse = true;  // the query's intermediates are its own
  run.fast = true;    // stacking is fast mode only
  run.workspace = &workspace_;
  HZO_NVTX(r, "hzo/stacked" + std::to_string(S) + "x" + std::to_string(s0.m) + "-" + std::to_string(s0.j));
  std::vector<at::Tensor> a, targets;
  std::vector<double> eps;
  bool same_eps = true;
  for (const SplitPlan* s : group) {
    a.push_back(acts_[s->m]);
    targets.push_back(deltas[s->j]);
    eps.push_back(step(acts_[s->m]));
    same_eps = same_eps && eps.back() == eps[0];
  }
  std::vector<Stacked> stages;  // position l of every right sub-network, weights stacked once
  for (int64_t l = 0; l < s0.j - s0.m; ++l) {
    std::vector<const Node*> nodes;
    for (const SplitPlan* s : group) nodes.push_back(&stages_[s->m + l]);
    stages.emplace_back(nodes);
  }
  const at::Tensor target = at::cat(targets);  // [S * B, Q]
  std::vector<at::Tensor> delta(group.size());
  for (size_t ci = 0; ci < s0.chunks.size(); ++ci) {
    const Chunk& c = s0.chunks[ci];
    const int64_t K = c.ids.numel();
    at::Tensor z = workspace_.empty({S, 2, K, B, n}, a[0].options());
    if (same_eps) {  // one perturb of the S activations side by side: [2, K, S*B, n] -> [S, 2, K, B, n]
      z.copy_(perturb_op(at::cat(a), s0.colors, c.ids, eps[0]).view({2, K, S, B, n}).permute({2, 0, 1, 3, 4}));
    } else {
      for (int64_t k = 0; k < S; ++k) z[k].copy_(perturb_op(a[k], s0.colors, c.ids, eps[k]));
    }
    z = z.view({S, 2 * K * B, n});
    for (const auto& st : stages) z = st.forward(z, run);
    const int64_t Q = z.size(2);
    if (same_eps) {  // one contraction of all S: [S, 2, K, B, Q] -> [2, K, S*B, Q]
      at::Tensor y = workspace_.empty({2, K, S, B, Q}, z.options());
      y.copy_(z.view({S, 2, K, B, Q}).permute({1, 2, 0, 3, 4}));
      z.reset();  // its buffer is free for the next chunk
      y = y.view({2, K, S * B, Q});
      const at::Tensor part = contract_chunk(c, nullptr, y, target, eps[0], s0.num_inputs).view({S, B, -1});
      for (int64_t k = 0; k < S; ++k) delta[k] = delta[k].defined() ? delta[k] + part[k] : part[k];
    } else {
      for (int64_t k = 0; k < S; ++k) {
        const at::Tensor part =
            contract_chunk(c, nullptr, z[k].view({2, K, B, Q}), targets[k], eps[k], s0.num_inputs);
        delta[k] = delta[k].defined() ? delta[k] + part : part;
      }
    }
  }
  for (int64_t k = 0; k < S; ++k) deltas[group[k]->m] = delta[k].reshape(acts_[group[k]->m].sizes());
}

void Executor::run_level(const std::vector<SplitPlan>& level, std::vector<at::Tensor>& deltas, Outcome& out) const {
  std::vector<RunCounts> calls(level.size());
  std::vector<bool> done(level.size(), false);
  if (options_.fast) {  // groups of small same-shaped splits, each run as one stacked query
    for (size_t k = 0; k < level.size(); ++k) {
      if (done[k]) continue;
      std::vector<const SplitPlan*> group{&level[k]};
      for (size_t o = k + 1; o < level.size(); ++o) {
        if (!done[o] && stackable(level[k], level[o])) group.push_back(&level[o]);
      }
      if (group.size() < 2) continue;
      run_stacked(group, deltas, calls[k]);
      for (const SplitPlan* s : group) done[static_cast<size_t>(s - level.data())] = true;
      out.stacked += static_cast<int64_t>(group.size());
    }
  }
  // The splits of a level are independent. When every query tensor is below ATen's parallel
  // grain, every op runs single-threaded in the Python path too, so running the splits on
  // concurrent threads (each op then single-threaded) gives the same bits.
  bool concurrent = level.size() > 1 && at::get_num_threads() > 1 && !at::in_parallel_region();
  for (size_t k = 0; k < level.size() && concurrent; ++k) concurrent = done[k] || single_threaded(level[k]);
  if (concurrent) {
    for (size_t k = 0; k < level.size(); ++k) out.concurrent += done[k] ? 0 : 1;
    const at::ThreadLocalState tls;  // grad mode, dispatch-key exclusions: as on this thread
    std::vector<at::Tensor> results(level.size());
    at::parallel_for(0, static_cast<int64_t>(level.size()), 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard guard(tls);
      for (int64_t k = begin; k < end; ++k) {
        if (!done[k]) results[k] = probe_split(level[k], deltas[level[k].j], calls[k]);
      }
    });
    for (size_t k = 0; k < level.size(); ++k) {
      if (!done[k]) deltas[level[k].m] = results[k];
    }
  } else {
    for (size_t k = 0; k < level.size(); ++k) {
      if (!done[k]) deltas[level[k].m] = probe_split(level[k], deltas[level[k].j], calls[k]);
    }
  }
  for (size_t k = 0; k < level.size(); ++k) {
    out.python_calls += calls[k].python_calls;
    out.folded += calls[k].folded;
    out.folded_flops += calls[k].folded_flops;
    out.fd_layer_evals += level[k].queries;
    out.probes += level[k].probes;
    out.splits += 1;
  }
}

void Executor::leaves(const std::vector<at::Tensor>& deltas) {
  HZO_NVTX(range, "hzo/leaves");
  // The local VJP of every stage with grad_output delta_l: Node::backward on the stages with a
  // tape, one autograd call for the others (their inputs were detached in the clean forward,
  // so the graphs are disjoint).
  std::vector<std::pair<at::Tensor, at::Tensor>> grads;
  std::vector<at::Tensor> outputs, grad_outputs, inputs;
  for (size_t l = 1; l < acts_.size(); ++l) {
    if (taped_[l - 1]) {
      stages_[l - 1].backward(deltas[l].to(acts_[l].scalar_type()), tapes_[l - 1], /*need_input=*/false, grads,
                              options_.fast);
      TORCH_CHECK(tapes_[l - 1].empty(), "hzo executor: stage ", l, "'s leaf left tape entries");
      continue;
    }
    if (!local_[l].defined()) continue;
    bool any = false;
    for (const auto& p : params_[l - 1]) {
      if (!p.requires_grad()) continue;
      any = true;
      bool seen = false;
      for (const auto& q : inputs) seen = seen || q.is_same(p);
      if (!seen) inputs.push_back(p);
    }
    if (!any) continue;
    outputs.push_back(local_[l]);
    grad_outputs.push_back(deltas[l].to(local_[l].scalar_type()));
  }
  if (!outputs.empty()) {
    auto from_autograd = torch::autograd::grad(outputs, inputs, grad_outputs, /*retain_graph=*/false,
                                               /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t k = 0; k < inputs.size(); ++k) {
      if (from_autograd[k].defined()) grads.emplace_back(inputs[k], std::move(from_autograd[k]));
    }
  }
  // Like autograd's AccumulateGrad: p.grad + g, or a fresh gradient nobody else holds (else a copy).
  for (auto& [p, g_in] : grads) {
    at::Tensor g = g_in.to(p.scalar_type());
    g_in = at::Tensor();
    at::Tensor param = p;
    if (!param.grad().defined()) {
      param.mutable_grad() = g.use_count() == 1 && !g.is_view() ? std::move(g) : g.clone();
    } else {
      param.mutable_grad() = param.grad() + g;
    }
  }
}

Outcome Executor::estimate(const Plan& plan, const at::Tensor& y, const LossCallback& per_sample_loss,
                           bool want_loss) {
  TORCH_CHECK(!acts_.empty(), "hzo executor: estimate() before forward()");
  Outcome out;
  const int64_t L = static_cast<int64_t>(stages_.size());
  std::vector<at::Tensor> deltas(static_cast<size_t>(L + 1));
  {
    at::NoGradGuard no_grad;
    if (want_loss && loss_.kind != LossKind::Callback) {
      const at::Tensor& z = acts_.back();
      out.loss = loss_.kind == LossKind::CrossEntropy
                     ? at::cross_entropy_loss(z, y, as_optional(loss_.weight), loss_.reduction, loss_.ignore_index,
                                              loss_.label_smoothing)
                     : at::mse_loss(z, y, loss_.reduction);
    }
    std::vector<at::Tensor> head_losses;
    deltas[L] = loss_head(plan, y, per_sample_loss, head_losses, out);
    for (size_t k = 0; k < plan.levels.size(); ++k) {
      HZO_NVTX(level, "hzo/level" + std::to_string(k));
      run_level(plan.levels[k], deltas, out);
    }
    // Finiteness of the head's per-sample losses and of every target, checked once; on failure,
    // the first in the Python path's order: the head, then the splits level by level.
    std::vector<at::Tensor> checked(head_losses);
    for (const auto& level : plan.levels) {
      for (const auto& s : level) checked.push_back(deltas[s.m]);
    }
    if (!all_finite(checked)) {
      for (size_t c = 0; c < head_losses.size() && out.failure.empty(); ++c) {
        if (all_finite({head_losses[c]})) continue;
        out.failure = "head";
        out.bad = head_losses[c];
      }
      for (size_t k = 0; k < plan.levels.size() && out.failure.empty(); ++k) {
        for (size_t s = 0; s < plan.levels[k].size() && out.failure.empty(); ++s) {
          if (all_finite({deltas[plan.levels[k][s].m]})) continue;
          out.failure = "split";
          out.level = static_cast<int64_t>(k);
          out.index = static_cast<int64_t>(s);
          out.bad = deltas[plan.levels[k][s].m];
        }
      }
      release();
      return out;
    }
  }
  leaves(deltas);
  release();
  return out;
}

}  // namespace hzo::exec
