// The C++ executor of one HZO estimate (docs/executor.md): clean forward, loss head, the splits
// level by level (perturb, query, contract through the hzo_ext ops), leaves. Stages are lowered
// by hzo_ext/executor.py into a tree of Nodes that run with ATen ops, the very ops the torch
// modules call, so every query is bit-for-bit the Python path's; a stage C++ cannot run is a
// Callback into Python. Torch-only (no pybind11): bindings live in bind.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "nvtx.h"

// Hidden like pybind11's own types (the bindings' classes would otherwise warn).
#pragma GCC visibility push(hidden)

namespace hzo::exec {

// Buffers kept across estimates for the stacked queries of fast mode. On a CPU a fresh buffer of
// a few hundred KiB costs page faults comparable to the op that fills it (glibc hands freed
// blocks of that size back to the OS); these stay mapped. A buffer is free when no tensor but
// the workspace's own holds its storage. Used from one thread at a time.
class Workspace {
 public:
  // An uninitialised contiguous tensor in the smallest free buffer that fits (or a new one).
  at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options);
  // True when `storage` is one of the buffers (so the workspace holds one reference to it).
  bool owns(const c10::Storage& storage) const;

 private:
  static constexpr size_t kMaxBuffers = 16;  // beyond: plain allocations
  std::vector<at::Tensor> buffers_;          // 1-d
};

// Counts of running nodes: callback invocations, and the widest tensor any node produced
// (elements per row of its first dimension).
struct RunCounts {
  int64_t python_calls = 0;
  int64_t widest = 0;
  int64_t folded = 0;  // query chunks run with a folded first Linear
  int64_t folded_flops = 0;  // the matmul FLOPs (2 per multiply-add) folding skipped
  std::vector<at::Tensor>* tape = nullptr;  // when set, nodes record what their backward needs
  bool reuse = false;  // a query run: nodes may overwrite an input nothing else holds (overwritable)
  bool fast = false;   // fast mode: faster kernels with other round-off allowed (small GELUs)
  Workspace* workspace = nullptr;  // when set, stacked queries take their buffers from it
};

// True when a node may compute in place into x: a query run (run.reuse, no tape), x an
// intermediate no other tensor or view holds (the caller's one reference), dense, no autograd.
// The clean activations a_l are held by the executor, so they are never overwritten. In-place
// ATen ops give the bits of their out-of-place forms; they only save the allocation (on a CPU,
// fresh multi-MiB buffers cost page faults comparable to the elementwise op itself).
bool overwritable(const at::Tensor& x, const RunCounts& run);

// skip + branch (a residual block's sum), into branch when it is overwritable and has skip's
// shape, dtype and strides (then the same bits and the same layout as the out-of-place sum).
at::Tensor residual_sum(const at::Tensor& skip, at::Tensor branch, const RunCounts& run);

// None for an undefined tensor (the optional arguments of ATen ops).
inline std::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// A stage Python runs: module(x) -> tensor.
using StageCallback = std::function<at::Tensor(const at::Tensor&)>;
// The per-sample loss Python runs: (perturbed logits [nB, *T], n copies) -> [nB, 1].
using LossCallback = std::function<at::Tensor(const at::Tensor&, int64_t)>;

enum class Kind {
  Linear, Conv, BatchNorm, ReLU, GELU, Tanh, Sigmoid, SiLU, LeakyReLU, ELU, Softplus, Hardtanh, Mish,
  Hardswish, Hardsigmoid, MaxPool, AvgPool, AdaptiveAvgPool, Flatten, Identity, Sequential, Residual, Callback
};

// One lowered module. `tensors` are the module's own parameter/buffer tensors (not copies: an
// optimizer's in-place updates are seen); an undefined tensor stands for None.
struct Node {
  Kind kind = Kind::Identity;
  std::vector<at::Tensor> tensors;
  int64_t nd = 0;  // spatial dims of a conv or pool
  std::vector<int64_t> kernel, stride, padding, dilation, out_size, dims;
  int64_t groups = 1, start_dim = 1, end_dim = -1;
  bool ceil_mode = false, count_include_pad = true, has_shortcut = false;
  bool inplace = false;  // an activation's inplace=True: the same aliasing as the module
  std::optional<int64_t> divisor;
  double p0 = 0, p1 = 0;  // scalar parameters (slope, alpha, beta/threshold, min/max, momentum/eps)
  std::string text;       // GELU approximate, conv string padding
  std::vector<Node> children;
  StageCallback callback;

  // Builds a node from the flat description hzo_ext/executor.py sends (see there); throws on a
  // malformed one.
  static Node make(const std::string& kind, std::vector<at::Tensor> tensors, const std::vector<int64_t>& ints,
                   const std::vector<double>& floats, std::string text, std::vector<Node> children,
                   StageCallback callback);

  // The module's forward on x, counting into `run`.
  at::Tensor forward(const at::Tensor& x, RunCounts& run) const;
  // True when the node is, or starts with, a Linear whose +-eps input moves can be folded
  // (through Sequentials, and ResidualBlocks with an identity or foldable shortcut).
  bool foldable() const;
  // True when `other` computes the same function of other parameters of the same shapes, with
  // only Linear, activation, Identity, Sequential and Residual nodes: S such nodes run as one
  // on a stacked input [S, rows, features] (see executor.cpp, Stacked).
  bool stackable_with(const Node& other) const;
  // True when backward() below covers the node (Linear, out-of-place activations, Identity,
  // Flatten, and Sequential/Residual of those): its leaf needs no autograd graph.
  bool explicit_vjp() const;
  // True when the node has a parameter that requires grad.
  bool trainable() const;
  // The local VJP of a node run by forward() with a tape: pops its tape entries, appends
  // (parameter, gradient) pairs, and returns the input's gradient when `need_input` (else
  // undefined: nothing upstream in the stage needs it).
  at::Tensor backward(const at::Tensor& grad, std::vector<at::Tensor>& tape, bool need_input,
                      std::vector<std::pair<at::Tensor, at::Tensor>>& grads, bool fast) const;
  // forward() without the counting of its own output.
  at::Tensor compute(const at::Tensor& x, RunCounts& run) const;
  // True when running the node calls Python.
  bool calls_python() const;
};

// Probe ids of one chunk and, for dense probes, its owner map [K, prod(T)] when small enough to
// keep (undefined: built per use).
struct Chunk {
  int64_t start = 0;  // ids = start, start + 1, ...
  at::Tensor ids;
  at::Tensor owner;
};

// An SPP split's geometry, for hzo_ext::contract_spp (hzo_ext/spp.py SpatialColoring).
struct SppGeometry {
  at::Tensor colors;                  // [prod(C, *S)] (the split's colors)
  at::Tensor boxes;                   // [2, sum(S)] footprint intervals per input position
  std::vector<int64_t> in_shape;      // [C, *S]
  std::vector<int64_t> geometry_out;  // [C', *T] (the output before a Flatten of 1s)
  bool channelwise = false;
};

struct SplitPlan {
  int64_t i = 0, m = 0, j = 0, probes = 0, queries = 0, num_inputs = 0, num_outputs = 0;
  bool dense = true;
  at::Tensor colors;  // [prod(S_m)]
  std::optional<SppGeometry> spp;  // set for SPP splits
  std::vector<Chunk> chunks;
};

struct Plan {
  std::vector<std::vector<SplitPlan>> levels;
  at::Tensor head_colors;  // the loss head: dense over the logits
  std::vector<Chunk> head_chunks;
  int64_t head_inputs = 0;
};

// A plan's probe ids, chunk_size at a time, on `device`, with their dense owner maps for
// num_outputs outputs per sample when small enough to keep (dense_owners).
std::vector<Chunk> make_chunks(int64_t num_probes, std::optional<int64_t> chunk_size, const at::Device& device,
                               bool dense_owners, int64_t num_outputs);

enum class LossKind { CrossEntropy, MSE, Callback };

struct LossSpec {
  LossKind kind = LossKind::Callback;
  at::Tensor weight;          // CrossEntropy class weights (undefined: none)
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  int64_t reduction = 1;      // at::Reduction: 1 mean, 2 sum
};

struct Options {
  double eps = 1e-3;
  bool relative = false;  // eps * rms(a) per perturbed activation
  std::optional<int64_t> chunk_size;
  // Allow reassociating floating-point work (round-off then differs from the Python path):
  // fold +-eps into the first Linear of a right sub-network where that saves a large matmul,
  // and run the small same-shaped right sub-networks of a level as one stacked query.
  bool fast = false;
};

// What one estimate did; `failure` names the first non-finite target ("" when none), in which
// case no gradient was written and `bad` is the offending tensor.
struct Outcome {
  std::string failure;  // "", "head" or "split"
  int64_t level = -1, index = -1;
  at::Tensor bad;
  at::Tensor loss;      // the reduced loss (when asked for)
  int64_t loss_evals = 0, fd_layer_evals = 0, probes = 0, splits = 0, python_calls = 0;
  int64_t folded = 0, stacked = 0, concurrent = 0;  // splits run folded, stacked, on concurrent threads
  int64_t folded_flops = 0;  // matmul FLOPs skipped by folding
};

class Executor {
 public:
  Executor(std::vector<Node> stages, std::vector<std::vector<at::Tensor>> stage_params, LossSpec loss,
           Options options);

  // Clean forward a_0..a_L (kept for estimate()); throws on a failing or non-finite stage, or a
  // stage that drops the batch dimension (the caller reruns the Python path for its message).
  std::vector<at::Tensor> forward(const at::Tensor& x);

  // Loss head, splits and leaves on the activations of the last forward(). `per_sample_loss`
  // replaces the native loss head when set. `want_loss`: compute the reduced loss too.
  Outcome estimate(const Plan& plan, const at::Tensor& y, const LossCallback& per_sample_loss, bool want_loss);

  int64_t forward_python_calls() const { return forward_calls_; }
  // Drops the activations and graphs of the last forward (estimate() does it when it ends).
  void release();
  const Options& options() const { return options_; }

 private:
  double step(const at::Tensor& a) const;
  at::Tensor run_range(int64_t m, int64_t j, at::Tensor z, RunCounts& run) const;
  at::Tensor probe_split(const SplitPlan& s, const at::Tensor& target, RunCounts& run) const;
  at::Tensor query_chunk(const SplitPlan& s, const Chunk& c, const at::Tensor& a, double eps, RunCounts& run) const;
  bool single_threaded(const SplitPlan& s) const;
  at::Tensor loss_head(const Plan& plan, const at::Tensor& y, const LossCallback& per_sample_loss,
                       std::vector<at::Tensor>& checked, Outcome& out) const;
  void run_level(const std::vector<SplitPlan>& level, std::vector<at::Tensor>& deltas, Outcome& out) const;
  bool stackable(const SplitPlan& a, const SplitPlan& b) const;
  void run_stacked(const std::vector<const SplitPlan*>& group, std::vector<at::Tensor>& deltas, RunCounts& run) const;
  void leaves(const std::vector<at::Tensor>& deltas);

  std::vector<Node> stages_;
  std::vector<std::vector<at::Tensor>> params_;  // per stage, as stage.parameters() lists them
  LossSpec loss_;
  Options options_;
  std::vector<at::Tensor> acts_, local_;
  std::vector<std::vector<at::Tensor>> tapes_;  // per stage with an explicit leaf: its tape
  std::vector<bool> explicit_;                  // per stage: Node::backward covers it
  std::vector<bool> taped_;                     // per stage: the last forward recorded a tape
  mutable Workspace workspace_;                 // fast mode's stacked queries (run_stacked)
  std::vector<bool> python_;     // per stage: calls Python
  std::vector<int64_t> widest_;  // per stage: widest tensor per sample in the last clean forward
  int64_t forward_calls_ = 0;
  NvtxSpan estimate_range_;  // hzo/estimate: from the clean forward to the leaves
};

// hzo_ext::perturb through the dispatcher (below autograd): the +-eps copies [2, K, B, *S].
at::Tensor perturb_op(const at::Tensor& a, const at::Tensor& colors, const at::Tensor& ids, double eps);

// The owner map of dense probes ids [K]: [K, num_outputs], row k all ids[k] (ops.dense_owner).
at::Tensor dense_owner(const at::Tensor& ids, int64_t num_outputs);

// The one place a chunk's query outputs y [2, K, B, *T] are contracted with the target [B, *T]
// (through the dispatcher: hzo_ext::contract_spp for an SPP split, spp set; else
// hzo_ext::contract_sized with the dense owner map, built here when the chunk has none).
at::Tensor contract_chunk(const Chunk& c, const SppGeometry* spp, const at::Tensor& y, const at::Tensor& target,
                          double eps, int64_t num_inputs);

}  // namespace hzo::exec

#pragma GCC visibility pop
