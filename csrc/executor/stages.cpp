// Lowered stages: each node runs the ATen op its torch module's forward calls, with the same
// arguments, so results are bit-for-bit those of the module (hzo_ext/executor.py lowers only
// modules whose forward is the stock one).
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <unordered_map>

#include "executor.h"

namespace hzo::exec {

namespace {

const std::unordered_map<std::string, Kind>& kinds() {
  static const std::unordered_map<std::string, Kind> table{
      {"linear", Kind::Linear},       {"conv", Kind::Conv},           {"batch_norm", Kind::BatchNorm},
      {"relu", Kind::ReLU},           {"gelu", Kind::GELU},           {"tanh", Kind::Tanh},
      {"sigmoid", Kind::Sigmoid},     {"silu", Kind::SiLU},           {"leaky_relu", Kind::LeakyReLU},
      {"elu", Kind::ELU},             {"softplus", Kind::Softplus},   {"hardtanh", Kind::Hardtanh},
      {"mish", Kind::Mish},           {"hardswish", Kind::Hardswish}, {"hardsigmoid", Kind::Hardsigmoid},
      {"max_pool", Kind::MaxPool},
      {"avg_pool", Kind::AvgPool},    {"adaptive_avg_pool", Kind::AdaptiveAvgPool},
      {"flatten", Kind::Flatten},     {"identity", Kind::Identity},   {"seq", Kind::Sequential},
      {"residual", Kind::Residual},   {"callback", Kind::Callback}};
  return table;
}

// Reads ints[pos .. pos+n) and advances pos.
std::vector<int64_t> take(const std::vector<int64_t>& ints, size_t& pos, int64_t n, const std::string& kind) {
  TORCH_CHECK(n >= 0 && pos + static_cast<size_t>(n) <= ints.size(), "hzo executor: malformed '", kind,
              "' node (", ints.size(), " ints)");
  std::vector<int64_t> out(ints.begin() + static_cast<int64_t>(pos), ints.begin() + static_cast<int64_t>(pos) + n);
  pos += static_cast<size_t>(n);
  return out;
}

// oneDNN runs GELU and its backward on contiguous float32 CPU tensors at a fixed cost per call
// (about 6 us forward, 11 us backward with torch 2.14 on one thread), most of the time of a
// small one; ATen's own kernel, which it takes for other layouts, needs 1-5 us there. Fast mode
// runs GELUs below this many elements on a transposed view (other bits: round-off only).
constexpr int64_t kNativeGeluBelow = int64_t{1} << 14;

bool native_gelu_pays(const at::Tensor& x) {
  return x.device().is_cpu() && x.dim() >= 2 && x.numel() < kNativeGeluBelow && x.size(-1) > 1 &&
         x.size(-2) > 1 && x.is_contiguous();  // then the transposed view is not contiguous
}

}  // namespace

Node Node::make(const std::string& kind, std::vector<at::Tensor> tensors, const std::vector<int64_t>& ints,
                const std::vector<double>& floats, std::string text, std::vector<Node> children,
                StageCallback callback) {
  auto it = kinds().find(kind);
  TORCH_CHECK(it != kinds().end(), "hzo executor: unknown node kind '", kind, "'");
  Node n;
  n.kind = it->second;
  n.tensors = std::move(tensors);
  n.text = std::move(text);
  n.children = std::move(children);
  n.callback = std::move(callback);
  size_t pos = 0;
  auto need = [&](size_t t, size_t f) {
    TORCH_CHECK(n.tensors.size() == t && floats.size() == f, "hzo executor: malformed '", kind, "' node");
  };
  switch (n.kind) {
    case Kind::Linear:
      need(2, 0);
      break;
    case Kind::Conv: {  // ints: nd, groups, stride[nd], padding[nd], dilation[nd]; text: string padding
      need(2, 0);
      n.nd = take(ints, pos, 1, kind)[0];
      TORCH_CHECK(n.nd >= 1 && n.nd <= 3, "hzo executor: conv with ", n.nd, " spatial dims");
      n.groups = take(ints, pos, 1, kind)[0];
      n.stride = take(ints, pos, n.nd, kind);
      n.padding = take(ints, pos, n.nd, kind);
      n.dilation = take(ints, pos, n.nd, kind);
      break;
    }
    case Kind::BatchNorm:  // tensors: weight, bias, running_mean, running_var; floats: momentum, eps
      need(4, 2);
      n.p0 = floats[0];
      n.p1 = floats[1];
      n.dims = ints;  // the input ranks the module accepts
      break;
    case Kind::ReLU:
    case Kind::Tanh:
    case Kind::Sigmoid:
    case Kind::SiLU:
    case Kind::Mish:
    case Kind::Hardswish:
    case Kind::Hardsigmoid:
    case Kind::Identity:
    case Kind::LeakyReLU:
    case Kind::ELU:
    case Kind::Softplus:
    case Kind::Hardtanh:  // ints: [inplace]; floats: the scalar parameters
      TORCH_CHECK(n.tensors.empty() && floats.size() <= 2, "hzo executor: malformed '", kind, "' node");
      n.inplace = !ints.empty() && ints[0] != 0;
      if (!floats.empty()) n.p0 = floats[0];
      if (floats.size() > 1) n.p1 = floats[1];
      break;
    case Kind::MaxPool: {  // ints: nd, ceil, kernel[nd], stride[nd], padding[nd], dilation[nd]
      need(0, 0);
      n.nd = take(ints, pos, 1, kind)[0];
      TORCH_CHECK(n.nd >= 1 && n.nd <= 2, "hzo executor: max pool with ", n.nd, " spatial dims");
      n.ceil_mode = take(ints, pos, 1, kind)[0] != 0;
      n.kernel = take(ints, pos, n.nd, kind);
      n.stride = take(ints, pos, n.nd, kind);
      n.padding = take(ints, pos, n.nd, kind);
      n.dilation = take(ints, pos, n.nd, kind);
      break;
    }
    case Kind::AvgPool: {  // ints: nd, ceil, count_include_pad, has_divisor, divisor, kernel, stride, padding
      need(0, 0);
      n.nd = take(ints, pos, 1, kind)[0];
      TORCH_CHECK(n.nd >= 1 && n.nd <= 2, "hzo executor: avg pool with ", n.nd, " spatial dims");
      n.ceil_mode = take(ints, pos, 1, kind)[0] != 0;
      n.count_include_pad = take(ints, pos, 1, kind)[0] != 0;
      const bool has_divisor = take(ints, pos, 1, kind)[0] != 0;
      const int64_t divisor = take(ints, pos, 1, kind)[0];
      if (has_divisor) n.divisor = divisor;
      n.kernel = take(ints, pos, n.nd, kind);
      n.stride = take(ints, pos, n.nd, kind);
      n.padding = take(ints, pos, n.nd, kind);
      break;
    }
    case Kind::AdaptiveAvgPool:  // ints: nd, output size[nd] (-1: the input's size)
      need(0, 0);
      n.nd = take(ints, pos, 1, kind)[0];
      TORCH_CHECK(n.nd >= 1 && n.nd <= 2, "hzo executor: adaptive pool with ", n.nd, " spatial dims");
      n.out_size = take(ints, pos, n.nd, kind);
      break;
    case Kind::Flatten:
      n.start_dim = take(ints, pos, 1, kind)[0];
      n.end_dim = take(ints, pos, 1, kind)[0];
      break;
    case Kind::Residual:  // children: module, then the shortcut if any
      TORCH_CHECK(n.children.size() == 1 || n.children.size() == 2, "hzo executor: malformed residual node");
      n.has_shortcut = n.children.size() == 2;
      break;
    case Kind::Callback:
      TORCH_CHECK(static_cast<bool>(n.callback), "hzo executor: callback node without a callable");
      break;
    default:
      break;
  }
  return n;
}

at::Tensor Node::forward(const at::Tensor& x, RunCounts& run) const {
  at::Tensor out = compute(x, run);
  if (out.dim() > 0 && out.size(0) > 0) run.widest = std::max(run.widest, out.numel() / out.size(0));
  if (run.tape) {  // what backward() needs: the output of tanh and sigmoid, the input of the others
    if (kind == Kind::Tanh || kind == Kind::Sigmoid) {
      run.tape->push_back(out);
    } else if (kind != Kind::Sequential && kind != Kind::Residual && kind != Kind::Identity) {
      run.tape->push_back(x);
    }
  }
  return out;
}

bool Node::explicit_vjp() const {
  switch (kind) {
    case Kind::Linear: case Kind::GELU: case Kind::Tanh: case Kind::Sigmoid: case Kind::Identity:
    case Kind::Flatten:
      return true;
    case Kind::ReLU: case Kind::SiLU: case Kind::LeakyReLU: case Kind::ELU: case Kind::Softplus:
    case Kind::Hardtanh: case Kind::Mish: case Kind::Hardswish: case Kind::Hardsigmoid:
      return !inplace;  // an in-place activation overwrites the input its backward needs
    case Kind::Sequential:
    case Kind::Residual:
      for (const auto& c : children) {
        if (!c.explicit_vjp()) return false;
      }
      return true;
    default:
      return false;
  }
}

bool Node::trainable() const {
  for (const auto& t : tensors) {
    if (t.defined() && t.requires_grad()) return true;
  }
  for (const auto& c : children) {
    if (c.trainable()) return true;
  }
  return false;
}

at::Tensor Node::backward(const at::Tensor& g, std::vector<at::Tensor>& tape, bool need_input,
                          std::vector<std::pair<at::Tensor, at::Tensor>>& grads, bool fast) const {
  auto pop = [&tape]() {
    TORCH_CHECK(!tape.empty(), "hzo executor: leaf tape exhausted");
    at::Tensor t = std::move(tape.back());
    tape.pop_back();
    return t;
  };
  switch (kind) {
    case Kind::Sequential: {
      at::Tensor grad = g;
      for (size_t c = children.size(); c-- > 0;) {
        bool upstream = need_input;  // does anything before child c need a gradient?
        for (size_t u = 0; u < c && !upstream; ++u) upstream = children[u].trainable();
        // with no gradient left (nothing upstream), the children only drop their tape entries
        grad = children[c].backward(grad, tape, upstream && grad.defined(), grads, fast);
      }
      return need_input ? grad : at::Tensor();
    }
    case Kind::Residual: {  // forward ran the shortcut first: its tape entries lie below the module's
      at::Tensor through = children[0].backward(g, tape, need_input, grads, fast);
      at::Tensor skip = has_shortcut ? children[1].backward(g, tape, need_input, grads, fast) : g;
      return need_input && g.defined() ? skip + through : at::Tensor();
    }
    case Kind::Identity:
      return need_input ? g : at::Tensor();
    default:
      break;
  }
  const at::Tensor x = pop();  // the input (the output for tanh and sigmoid)
  if (!g.defined()) return at::Tensor();
  switch (kind) {
    case Kind::Linear: {
      const at::Tensor& W = tensors[0];
      const at::Tensor g2 = g.reshape({-1, W.size(0)});
      if (W.requires_grad()) grads.emplace_back(W, g2.t().mm(x.reshape({-1, W.size(1)})));
      if (tensors[1].defined() && tensors[1].requires_grad()) grads.emplace_back(tensors[1], g2.sum(0));
      return need_input ? at::matmul(g, W) : at::Tensor();
    }
    case Kind::Flatten: return need_input ? g.reshape(x.sizes()) : at::Tensor();
    default:
      break;
  }
  if (!need_input) return at::Tensor();
  switch (kind) {
    case Kind::GELU:
      if (fast && native_gelu_pays(x) && g.is_contiguous()) {
        return at::gelu_backward(g.transpose(-2, -1), x.transpose(-2, -1), text).transpose(-2, -1).contiguous();
      }
      return at::gelu_backward(g, x, text);
    case Kind::Tanh: return at::tanh_backward(g, x);
    case Kind::Sigmoid: return at::sigmoid_backward(g, x);
    case Kind::ReLU: return at::threshold_backward(g, x, 0);
    case Kind::SiLU: return at::silu_backward(g, x);
    case Kind::LeakyReLU: return at::leaky_relu_backward(g, x, p0, false);
    case Kind::ELU: return at::elu_backward(g, p0, 1, 1, false, x);
    case Kind::Softplus: return at::softplus_backward(g, x, p0, p1);
    case Kind::Hardtanh: return at::hardtanh_backward(g, x, p0, p1);
    case Kind::Mish: return at::mish_backward(g, x);
    case Kind::Hardswish: return at::hardswish_backward(g, x);
    case Kind::Hardsigmoid: return at::hardsigmoid_backward(g, x);
    default:
      TORCH_CHECK(false, "hzo executor: no explicit VJP for this node");
  }
}

bool overwritable(const at::Tensor& x, const RunCounts& run) {
  if (!run.reuse || run.tape != nullptr || x.use_count() != 1 || x.requires_grad() ||
      !x.is_non_overlapping_and_dense()) {
    return false;
  }
  const auto holders = x.storage().use_count();  // x, and the workspace when x is one of its buffers
  return holders == 1 || (holders == 2 && run.workspace && run.workspace->owns(x.storage()));
}

at::Tensor residual_sum(const at::Tensor& skip, at::Tensor branch, const RunCounts& run) {
  if (overwritable(branch, run) && branch.sizes() == skip.sizes() && branch.strides() == skip.strides() &&
      branch.scalar_type() == skip.scalar_type() && branch.device() == skip.device()) {
    return branch.add_(skip);  // IEEE addition commutes: the bits of skip + branch
  }
  return skip + branch;
}

at::Tensor Node::compute(const at::Tensor& x, RunCounts& run) const {
  // The module's own in-place flag, or a query intermediate nothing else holds (checked before
  // `self` takes a second reference).
  const bool in_place = inplace || overwritable(x, run);
  at::Tensor self = x;  // the in-place activations' argument
  switch (kind) {
    case Kind::Linear:
      return at::linear(x, tensors[0], as_optional(tensors[1]));
    case Kind::Conv: {
      const auto bias = as_optional(tensors[1]);
      if (!text.empty()) {  // padding='same' / 'valid'
        switch (nd) {
          case 1: return at::conv1d(x, tensors[0], bias, stride, text, dilation, groups);
          case 2: return at::conv2d(x, tensors[0], bias, stride, text, dilation, groups);
          default: return at::conv3d(x, tensors[0], bias, stride, text, dilation, groups);
        }
      }
      switch (nd) {
        case 1: return at::conv1d(x, tensors[0], bias, stride, padding, dilation, groups);
        case 2: return at::conv2d(x, tensors[0], bias, stride, padding, dilation, groups);
        default: return at::conv3d(x, tensors[0], bias, stride, padding, dilation, groups);
      }
    }
    case Kind::BatchNorm: {
      bool ok = false;
      for (auto d : dims) ok = ok || x.dim() == d;
      TORCH_CHECK(ok, "hzo executor: batch norm on an input of rank ", x.dim());
      return at::batch_norm(x, as_optional(tensors[0]), as_optional(tensors[1]), as_optional(tensors[2]),
                            as_optional(tensors[3]), /*training=*/false, p0, p1,
                            at::globalContext().userEnabledCuDNN());
    }
    case Kind::ReLU: return in_place ? at::relu_(self) : at::relu(x);
    case Kind::GELU:
      if (run.fast && native_gelu_pays(x)) {
        if (in_place) {
          at::Tensor view = self.transpose(-2, -1);
          at::gelu_(view, text);
          return self;
        }
        return at::gelu(x.transpose(-2, -1), text).transpose(-2, -1).contiguous();
      }
      return in_place ? at::gelu_(self, text) : at::gelu(x, text);
    case Kind::Tanh: return in_place ? at::tanh_(self) : at::tanh(x);
    case Kind::Sigmoid: return in_place ? at::sigmoid_(self) : at::sigmoid(x);
    case Kind::SiLU: return in_place ? at::silu_(self) : at::silu(x);
    case Kind::LeakyReLU: return in_place ? at::leaky_relu_(self, p0) : at::leaky_relu(x, p0);
    case Kind::ELU: return in_place ? at::elu_(self, p0) : at::elu(x, p0);
    case Kind::Softplus: return at::softplus(x, p0, p1);
    case Kind::Hardtanh: return in_place ? at::hardtanh_(self, p0, p1) : at::hardtanh(x, p0, p1);
    case Kind::Mish: return in_place ? at::mish_(self) : at::mish(x);
    case Kind::Hardswish: return in_place ? at::hardswish_(self) : at::hardswish(x);
    case Kind::Hardsigmoid: return in_place ? at::hardsigmoid_(self) : at::hardsigmoid(x);
    case Kind::MaxPool:
      return nd == 1 ? at::max_pool1d(x, kernel, stride, padding, dilation, ceil_mode)
                     : at::max_pool2d(x, kernel, stride, padding, dilation, ceil_mode);
    case Kind::AvgPool:
      return nd == 1 ? at::avg_pool1d(x, kernel, stride, padding, ceil_mode, count_include_pad)
                     : at::avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor);
    case Kind::AdaptiveAvgPool: {
      std::vector<int64_t> size(out_size);
      for (int64_t a = 0; a < nd; ++a) {
        if (size[a] < 0) size[a] = x.size(x.dim() - nd + a);
      }
      return nd == 1 ? at::adaptive_avg_pool1d(x, size) : at::adaptive_avg_pool2d(x, size);
    }
    case Kind::Flatten: return x.flatten(start_dim, end_dim);
    case Kind::Identity: return x;
    case Kind::Sequential: {
      at::Tensor z = x;
      for (const auto& c : children) z = c.forward(z, run);
      return z;
    }
    case Kind::Residual: {  // (x if shortcut is None else shortcut(x)) + module(x), in that order
      at::Tensor skip = has_shortcut ? children[1].forward(x, run) : x;
      return residual_sum(skip, children[0].forward(x, run), run);
    }
    case Kind::Callback:
      ++run.python_calls;
      return callback(x);
  }
  TORCH_CHECK(false, "hzo executor: unhandled node kind");
}

bool Node::stackable_with(const Node& o) const {
  if (kind != o.kind || children.size() != o.children.size()) return false;
  switch (kind) {
    case Kind::Linear:
      return tensors[0].sizes() == o.tensors[0].sizes() && tensors[1].defined() == o.tensors[1].defined() &&
             tensors[0].scalar_type() == o.tensors[0].scalar_type();
    case Kind::ReLU: case Kind::GELU: case Kind::Tanh: case Kind::Sigmoid: case Kind::SiLU: case Kind::LeakyReLU:
    case Kind::ELU: case Kind::Softplus: case Kind::Hardtanh: case Kind::Mish: case Kind::Hardswish:
    case Kind::Hardsigmoid:
    case Kind::Identity:
      return text == o.text && p0 == o.p0 && p1 == o.p1;
    case Kind::Sequential:
    case Kind::Residual:
      for (size_t c = 0; c < children.size(); ++c) {
        if (!children[c].stackable_with(o.children[c])) return false;
      }
      return true;
    default:
      return false;
  }
}

bool Node::calls_python() const {
  if (kind == Kind::Callback) return true;
  for (const auto& c : children) {
    if (c.calls_python()) return true;
  }
  return false;
}

bool Node::foldable() const {
  switch (kind) {
    case Kind::Linear: return true;
    case Kind::Sequential: return !children.empty() && children[0].foldable();
    case Kind::Residual: return children[0].foldable() && (!has_shortcut || children[1].foldable());
    default: return false;
  }
}

}  // namespace hzo::exec
