// The op-level engine in C++ (op_executor.h). The order of the work and the ops called are those
// of hzo_ext/opengine.py (OpProgram.forward, OpRun.targets), so both engines give the same
// targets; the tests compare them with hzo_ext.reference to 1e-10 in float64.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>

#include "op_executor.h"

namespace hzo::exec {

namespace {

at::Tensor probe_elementwise_op(const at::Tensor& z, const at::Tensor& target, double eps, int64_t act, double alpha,
                                double beta) {
  at::AutoDispatchBelowAutograd below_autograd;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hzo_ext::probe_elementwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, double, double)>();
  return op.call(z, target, eps, act, alpha, beta);
}

// Its target comes from the op's VJP (the Python side flags every input of an affine op and the
// inputs a probed op is affine in).
bool folded(const OpStep& s, size_t k) { return s.folds[k]; }

void add_to(at::Tensor& acc, const at::Tensor& g) { acc = acc.defined() ? acc + g : g; }

// [n * B, ...] copies of a clean input that is not perturbed: repeated along the batch (a
// tensor without the batch dimension, made from sizes only, is passed as it is).
at::Tensor repeated(const at::Tensor& v, int64_t n, int64_t B) {
  if (v.dim() == 0 || v.size(0) != B) return v;
  std::vector<int64_t> reps(v.dim(), 1);
  reps[0] = n;
  return v.repeat(reps);
}

}  // namespace

at::Tensor AtenProgram::run(const std::vector<at::Tensor>& inputs) const {
  std::vector<at::Tensor> v;
  v.reserve(inputs.size() + tensors.size() + calls.size());
  for (const auto& t : inputs) v.push_back(clone_inputs ? t.clone() : t);
  v.insert(v.end(), tensors.begin(), tensors.end());
  torch::jit::Stack stack;
  for (const auto& c : calls) {
    stack.clear();
    for (const auto& a : c.args) {
      switch (a.kind) {
        case AtenArg::Kind::Const: stack.push_back(a.value); break;
        case AtenArg::Kind::Ref: stack.emplace_back(v[a.refs[0]]); break;
        case AtenArg::Kind::Refs: {
          std::vector<at::Tensor> list;
          for (int64_t r : a.refs) list.push_back(v[r]);
          stack.emplace_back(std::move(list));
          break;
        }
        case AtenArg::Kind::OptionalRefs: {
          c10::List<std::optional<at::Tensor>> list;
          for (int64_t r : a.refs) list.push_back(r < 0 ? std::nullopt : std::optional<at::Tensor>(v[r]));
          stack.emplace_back(std::move(list));
          break;
        }
      }
    }
    c.op.callBoxed(&stack);
    for (auto& r : stack) {
      if (r.isTensorList()) {
        for (const at::Tensor& t : r.toTensorVector()) v.push_back(t);
      } else {
        v.push_back(std::move(r).toTensor());
      }
    }
    TORCH_CHECK(static_cast<int64_t>(v.size()) == c.values_after, "hzo op executor: ", c.op.schema().name(),
                " gave another number of tensors than when it was recorded (", v.size(), " values, not ",
                c.values_after, ")");
  }
  return v[output];
}

OpExecutor::OpExecutor(std::vector<OpStep> steps, int64_t num_values, int64_t out_slot, double eps, bool relative)
    : steps_(std::move(steps)), num_values_(num_values), out_slot_(out_slot), eps_(eps), relative_(relative) {
  TORCH_CHECK(out_slot_ > 0 && out_slot_ < num_values_, "hzo op executor: output slot out of range");
  for (const auto& s : steps_) {
    TORCH_CHECK(s.output > 0 && s.output < num_values_, "hzo op executor: ", s.label, ": output slot out of range");
    TORCH_CHECK(s.wants.size() == s.inputs.size(), "hzo op executor: ", s.label, ": one wants flag per input");
    TORCH_CHECK(s.folds.size() == s.inputs.size(), "hzo op executor: ", s.label, ": one folds flag per input");
    TORCH_CHECK(s.fused_input < static_cast<int64_t>(s.inputs.size()) && (s.fused_input < 0) == !s.fused,
                "hzo op executor: ", s.label, ": a fused probe needs its program and its input");
    TORCH_CHECK(s.shared.empty() || s.shared.size() == s.inputs.size(), "hzo op executor: ", s.label,
                ": one shared flag per input");
    TORCH_CHECK(!s.inputs.empty() || s.call || s.program, "hzo op executor: ", s.label,
                " has no input and no program or callback");
    TORCH_CHECK(s.arith == Arith::None || s.inputs.size() == 2, "hzo op executor: ", s.label,
                ": arithmetic takes two inputs");
    TORCH_CHECK(s.arith != Arith::None || s.call || s.program || s.inputs.size() == 1, "hzo op executor: ",
                s.label, ": several inputs need a program or a callback");
    TORCH_CHECK(s.mode != OpMode::Probed || s.probes.size() == s.inputs.size(), "hzo op executor: ", s.label,
                ": one probe spec per input");
    for (int64_t v : s.inputs) {
      TORCH_CHECK(v >= 0 && v < s.output, "hzo op executor: ", s.label, " reads a value computed after it");
    }
  }
}

double OpExecutor::step(const at::Tensor& a) const {
  if (!relative_) return eps_;
  const double rms = a.to(at::kDouble).pow(2).mean().sqrt().item<double>();
  return rms > 0 && std::isfinite(rms) ? eps_ * rms : eps_;
}

void OpExecutor::release() {
  values_.clear();
  local_.clear();
  leaves_.clear();
}

at::Tensor OpExecutor::run(const OpStep& s, const std::vector<at::Tensor>& ins, RunCounts& counts) const {
  switch (s.arith) {
    case Arith::Add: return ins[0] + ins[1];
    case Arith::Sub: return ins[0] - ins[1];
    case Arith::Mul: return ins[0] * ins[1];
    case Arith::None: break;
  }
  if (s.program) return s.program->run(ins);
  if (s.call) {
    ++counts.python_calls;
    return s.call(ins);
  }
  return s.node.forward(ins[0], counts);
}

std::vector<at::Tensor> OpExecutor::forward(const at::Tensor& x) {
  release();
  values_.assign(num_values_, at::Tensor());
  local_.assign(steps_.size(), at::Tensor());
  leaves_.assign(steps_.size(), {});
  values_[0] = x.detach();
  RunCounts counts;
  for (size_t i = 0; i < steps_.size(); ++i) {
    const OpStep& s = steps_[i];
    const bool vjp = s.mode == OpMode::Affine || !s.params.empty() ||
                     std::find(s.folds.begin(), s.folds.end(), true) != s.folds.end();
    std::vector<at::Tensor> ins;
    for (size_t k = 0; k < s.inputs.size(); ++k) {
      const at::Tensor& v = values_[s.inputs[k]];
      if (vjp && folded(s, k) && s.wants[k]) {  // its VJP gives this input's target
        leaves_[i].push_back(v.detach().requires_grad_(true));
        ins.push_back(leaves_[i].back());
      } else {
        ins.push_back(v);
      }
    }
    at::Tensor out;
    {
      at::AutoGradMode grad_mode(vjp);
      out = run(s, ins, counts);
    }
    if (vjp) local_[i] = out;
    values_[s.output] = out.detach();
  }
  forward_python_calls_ = counts.python_calls;
  return values_;
}

at::Tensor OpExecutor::probe(const OpStep& s, size_t k, const at::Tensor& target, RunCounts& counts,
                             OpOutcome& out) const {
  const InputProbe& p = s.probes[k];
  const at::Tensor& a = values_[s.inputs[k]];
  const double eps = step(a);
  const int64_t B = a.size(0);
  at::Tensor delta;
  for (const auto& c : p.chunks) {
    const int64_t K = c.ids.numel();
    std::vector<int64_t> rows(a.sizes().begin(), a.sizes().end());
    rows[0] = -1;
    std::vector<at::Tensor> ins;
    for (size_t q = 0; q < s.inputs.size(); ++q) {
      ins.push_back(q == k                           ? perturb_op(a, p.colors, c.ids, eps).reshape(rows)  // [2KB, *S]
                    : !s.shared.empty() && s.shared[q] ? values_[s.inputs[q]]
                                                     : repeated(values_[s.inputs[q]], 2 * K, B));
    }
    const at::Tensor y = run(s, ins, counts);
    std::vector<int64_t> shape{2, K, B};
    shape.insert(shape.end(), y.sizes().begin() + 1, y.sizes().end());
    add_to(delta, contract_chunk(c, p.spp ? &*p.spp : nullptr, y.reshape(shape), target, eps, p.num_inputs));
  }
  out.probes += p.probes;
  out.fd_layer_evals += 2 * p.probes;
  return delta.reshape(a.sizes());
}

OpOutcome OpExecutor::targets(const at::Tensor& delta_out) {
  TORCH_CHECK(!values_.empty(), "hzo op executor: targets() before forward()");
  // Queries record no autograd graph (an op with parameters would record one per query); the
  // leaves' VJPs run on the graphs the clean forward kept.
  at::NoGradGuard no_grad;
  OpOutcome out;
  RunCounts counts;
  std::vector<at::Tensor> t(num_values_);
  t[out_slot_] = delta_out;
  // (op, all finite?) read once at the end; sum(0 * g) is nan exactly when g holds an inf or a
  // nan (never an overflow), a tenth of the time of isfinite(g).all() on a CPU
  std::vector<std::pair<int64_t, at::Tensor>> finite;
  for (int64_t i = static_cast<int64_t>(steps_.size()) - 1; i >= 0; --i) {
    const OpStep& s = steps_[i];
    at::Tensor ti = std::move(t[s.output]);
    t[s.output] = at::Tensor();
    if (!ti.defined()) {
      local_[i] = at::Tensor();
      continue;  // its output does not reach the loss
    }
    std::vector<std::pair<int64_t, at::Tensor>> got;  // (input slot, its target's part)
    std::vector<at::Tensor> param_grads;
    if (s.mode == OpMode::Affine || !leaves_[i].empty()) {  // A^T t and the weight gradient, by the op's VJP
      std::vector<at::Tensor> wrt(leaves_[i].begin(), leaves_[i].end());
      wrt.insert(wrt.end(), s.params.begin(), s.params.end());
      if (!wrt.empty() && local_[i].requires_grad()) {
        auto g = torch::autograd::grad({local_[i]}, wrt, {ti.to(local_[i].scalar_type())}, /*retain_graph=*/true,
                                       /*create_graph=*/false, /*allow_unused=*/true);
        size_t leaf = 0;  // (the plan counts what a fold stands for: hzo_ext Split.folded)
        for (size_t k = 0; k < s.inputs.size(); ++k) {
          if (!s.wants[k] || !folded(s, k)) continue;
          if (g[leaf].defined()) got.emplace_back(s.inputs[k], g[leaf]);
          ++leaf;
        }
        param_grads.assign(g.begin() + leaf, g.end());
      }
    }
    if (s.mode == OpMode::Elementwise || s.mode == OpMode::ElementwiseCall) {
      if (!s.wants.empty() && s.wants[0]) {
        const at::Tensor& a = values_[s.inputs[0]];
        const double eps = step(a);
        if (s.mode == OpMode::Elementwise) {
          got.emplace_back(s.inputs[0], probe_elementwise_op(a, ti, eps, s.act, s.alpha, s.beta));
        } else {  // no kernel code: the op itself on the stacked +-eps copies
          const at::Tensor y = run(s, {at::cat({a + eps, a - eps})}, counts);
          auto pm = y.chunk(2);
          got.emplace_back(s.inputs[0], ti * (pm[0] - pm[1]) / (2 * eps));
        }
        out.probes += 1;
        out.fd_layer_evals += 2;
      }
    } else if (s.mode == OpMode::Probed) {
      for (size_t k = 0; k < s.inputs.size(); ++k) {
        if (!s.wants[k] || folded(s, k)) continue;
        if (static_cast<int64_t>(k) == s.fused_input) {
          const at::Tensor& a = values_[s.inputs[k]];
          got.emplace_back(s.inputs[k], s.fused->run({a, ti, at::scalar_tensor(step(a), a.options())}));
          out.probes += 1;
          out.fd_layer_evals += 2;
        } else {
          got.emplace_back(s.inputs[k], probe(s, k, ti, counts, out));
        }
      }
      // the local VJP (already taken with the folded inputs' targets when there are any)
      if (leaves_[i].empty() && !s.params.empty() && local_[i].defined() && local_[i].requires_grad()) {
        param_grads = torch::autograd::grad({local_[i]}, s.params, {ti.to(local_[i].scalar_type())},
                                            /*retain_graph=*/true, /*create_graph=*/false, /*allow_unused=*/true);
      }
    }
    local_[i] = at::Tensor();
    for (auto& [slot, g] : got) {
      finite.emplace_back(i, at::isfinite((g * 0).sum()));
      add_to(t[slot], g);
    }
    for (size_t k = 0; k < param_grads.size(); ++k) {
      if (param_grads[k].defined()) out.grads.emplace_back(s.params[k], std::move(param_grads[k]));
    }
    ++out.splits;
  }
  out.python_calls = counts.python_calls + forward_python_calls_;  // the clean forward's too
  if (!finite.empty()) {
    std::vector<at::Tensor> flags;
    for (const auto& f : finite) flags.push_back(f.second);
    if (!at::stack(flags).all().item<bool>()) {
      for (const auto& f : finite) {
        if (!f.second.item<bool>()) {
          out.failure = f.first;
          break;
        }
      }
      out.grads.clear();
    }
  }
  return out;
}

}  // namespace hzo::exec
