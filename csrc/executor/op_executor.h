// The op-level engine in C++ (the default engine, hzo_ext/opengine.py, when the extension is
// loaded): the traced graph's ops, one split per op, walked from the output back. Each op is
// an ExecNode (the ATen op its module or function calls, lowered by hzo_ext/executor.py), a sum
// of two values, the ATen calls make_fx recorded for it (AtenProgram), or a Python callback
// (opaque nodes and ops no recording stands for). How each op is probed comes
// from the registry through the Python side: affine ops fold (their VJP, with their leaf),
// elementwise ops are one fused probe (hzo_ext::probe_elementwise), other ops take +-eps copies
// of each input (hzo_ext::perturb / contract, SPP where the coloring says). Torch-only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "executor.h"

#pragma GCC visibility push(hidden)

namespace hzo::exec {

// An op with several tensor inputs Python runs: inputs -> output.
using OpCallback = std::function<at::Tensor(const std::vector<at::Tensor>&)>;

enum class OpMode { Affine, Elementwise, ElementwiseCall, Probed };

// An op as the ATen calls make_fx recorded for it (hzo_ext/executor.py aten_program), run
// through the dispatcher (autograd records them as it records the Python op). Values: the
// op's inputs, then `tensors` (its parameters and buffers, the module's own), then each
// call's results in order (the tensors of a Tensor[] result one by one).
struct AtenArg {
  enum class Kind { Const, Ref, Refs, OptionalRefs } kind = Kind::Const;
  c10::IValue value;          // Const
  std::vector<int64_t> refs;  // Ref: one value; Refs: a Tensor[]; OptionalRefs: a Tensor?[] (-1: None)
};
struct AtenCall {
  explicit AtenCall(c10::OperatorHandle op) : op(std::move(op)) {}
  c10::OperatorHandle op;
  std::vector<AtenArg> args;  // one per schema argument
  int64_t values_after = 0;   // values after its results (a Tensor[] result gives one per tensor)
};
struct AtenProgram {
  std::vector<at::Tensor> tensors;
  std::vector<AtenCall> calls;
  int64_t output = 0;         // the value the op gives
  bool clone_inputs = false;  // a call writes in place: run on copies of the inputs
  at::Tensor run(const std::vector<at::Tensor>& inputs) const;
};
// Elementwise arithmetic between two values, run natively.
enum class Arith { None, Add, Sub, Mul };

// How one input of a probed op is probed: its colors, chunks of probe ids, SPP geometry (dense
// when unset).
struct InputProbe {
  at::Tensor colors;
  std::vector<Chunk> chunks;
  std::optional<SppGeometry> spp;
  int64_t num_inputs = 0, probes = 0;
};

struct OpStep {
  OpMode mode = OpMode::Probed;
  std::vector<int64_t> inputs;  // value slots of its x-dependent tensor inputs (slot 0: x); none
                                // for a callback reading sizes only (torch.zeros(x.size(0), 5))
  std::vector<bool> wants;      // per input: it needs a target (not x, floating)
  std::vector<bool> folds;      // per input: its target is the op's VJP (every input of an Affine
                                // op; those a Probed op is affine in, the values of attention)
  std::vector<bool> shared;     // per input: a tensor the same for every sample (a causal mask
                                // made from sizes), passed to every probe as it is
  int64_t output = 0;           // its value slot
  Node node;                    // one input: the lowered op (native or a Callback node)
  Arith arith = Arith::None;    // two inputs: inputs[0] + - * inputs[1]
  std::shared_ptr<const AtenProgram> program;  // when set: run by it
  OpCallback call;              // else, when set: Python runs it
  int64_t act = 0;              // Elementwise: the fused kernel's code, settings
  double alpha = 0, beta = 0;
  std::vector<at::Tensor> params;     // trainable parameters it reads (its leaf)
  std::vector<InputProbe> probes;     // Probed: per input
  // Probed: input fused_input's target is this program of (a, target, eps as a 0-dim tensor):
  // a layer norm's closed-form probe (hzo_ext.ops.probe_layer_norm, recorded)
  std::shared_ptr<const AtenProgram> fused;
  int64_t fused_input = -1;
  std::string label;
};

struct OpOutcome {
  int64_t failure = -1;  // the op whose query gave inf/nan (nearest the output), or -1
  int64_t probes = 0, fd_layer_evals = 0, splits = 0, python_calls = 0;
  std::vector<std::pair<at::Tensor, at::Tensor>> grads;  // (parameter, gradient), empty on failure
};

class OpExecutor {
 public:
  OpExecutor(std::vector<OpStep> steps, int64_t num_values, int64_t out_slot, double eps, bool relative);
  // The clean forward: every value (slot 0: x), detached; keeps the local graphs of the leaves.
  std::vector<at::Tensor> forward(const at::Tensor& x);
  // Targets from the output's (delta_out) back to every op's inputs, and the leaves; the
  // gradients are returned, not written (the caller accumulates them once all is finite).
  OpOutcome targets(const at::Tensor& delta_out);
  void release();

 private:
  double step(const at::Tensor& a) const;
  at::Tensor run(const OpStep& s, const std::vector<at::Tensor>& ins, RunCounts& counts) const;
  at::Tensor probe(const OpStep& s, size_t k, const at::Tensor& target, RunCounts& counts, OpOutcome& out) const;

  std::vector<OpStep> steps_;
  int64_t num_values_, out_slot_;
  double eps_;
  bool relative_;
  std::vector<at::Tensor> values_;
  std::vector<at::Tensor> local_;                 // per step: its output on autograd (leaves, folds)
  std::vector<std::vector<at::Tensor>> leaves_;   // per step: the leaves standing for its inputs (affine)
  int64_t forward_python_calls_ = 0;
};

}  // namespace hzo::exec

#pragma GCC visibility pop
