// pybind11 bindings of the executor (hzo_ext._C.ExecNode / ExecPlan / Executor), used by
// hzo_ext/executor.py. Python callables become callbacks that take the GIL; the executor's own
// work runs with the GIL released.
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "executor.h"
#include "op_executor.h"

namespace py = pybind11;

namespace hzo::exec {

namespace {

// Holds a Python object from C++ code that may run without the GIL (the last owner drops it
// with the GIL held).
std::shared_ptr<py::object> hold(py::object obj) {
  return std::shared_ptr<py::object>(new py::object(std::move(obj)), [](py::object* p) {
    py::gil_scoped_acquire gil;
    delete p;
  });
}

StageCallback stage_callback(py::object fn) {
  if (fn.is_none()) return {};
  auto held = hold(std::move(fn));
  return [held](const at::Tensor& x) -> at::Tensor {
    py::gil_scoped_acquire gil;
    py::object out = (*held)(x);
    if (!THPVariable_Check(out.ptr())) {
      throw std::runtime_error(std::string("hzo executor: a Python stage returned a ") +
                               Py_TYPE(out.ptr())->tp_name + ", not a tensor");
    }
    return THPVariable_Unpack(out.ptr());
  };
}

LossCallback loss_callback(py::object fn) {
  if (fn.is_none()) return {};
  auto held = hold(std::move(fn));
  return [held](const at::Tensor& copies, int64_t n) -> at::Tensor {
    py::gil_scoped_acquire gil;
    return (*held)(copies, n).cast<at::Tensor>();
  };
}

OpCallback op_callback(py::object fn) {
  if (fn.is_none()) return {};
  auto held = hold(std::move(fn));
  return [held](const std::vector<at::Tensor>& ins) -> at::Tensor {
    py::gil_scoped_acquire gil;
    py::tuple args(ins.size());
    for (size_t k = 0; k < ins.size(); ++k) args[k] = py::cast(ins[k]);
    py::object out = (*held)(*args);
    if (!THPVariable_Check(out.ptr())) {
      throw std::runtime_error(std::string("hzo op executor: a Python op returned a ") + Py_TYPE(out.ptr())->tp_name +
                               ", not a tensor");
    }
    return THPVariable_Unpack(out.ptr());
  };
}

std::vector<at::Tensor> tensors_of(const std::vector<std::optional<at::Tensor>>& in) {
  std::vector<at::Tensor> out;
  out.reserve(in.size());
  for (const auto& t : in) out.push_back(t ? *t : at::Tensor());
  return out;
}

// SPP geometry of a split: (colors, boxes, in_shape, geometry_out, channelwise) or None (dense).
using SppTuple = std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>, std::vector<int64_t>, bool>;
// levels: [[(i, m, j, probes, queries, num_inputs, num_outputs, SppTuple or None), ...], ...]
using SplitTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, std::optional<SppTuple>>;

Plan make_plan(const std::vector<std::vector<SplitTuple>>& levels, int64_t head_inputs,
               std::optional<int64_t> chunk_size, const std::string& device_str) {
  const at::Device device(device_str);
  const auto longs = at::TensorOptions().dtype(at::kLong).device(device);
  Plan plan;
  for (const auto& level : levels) {
    std::vector<SplitPlan> splits;
    for (const auto& [i, m, j, probes, queries, num_inputs, num_outputs, spp] : level) {
      SplitPlan s;
      s.i = i;
      s.m = m;
      s.j = j;
      s.probes = probes;
      s.queries = queries;
      s.num_inputs = num_inputs;
      s.num_outputs = num_outputs;
      s.dense = !spp.has_value();
      if (spp) {
        const auto& [colors, boxes, in_shape, geometry_out, channelwise] = *spp;
        s.spp = SppGeometry{colors, boxes, in_shape, geometry_out, channelwise};
        s.colors = colors;
      } else {
        s.colors = at::arange(num_inputs, longs);
      }
      s.chunks = make_chunks(probes, chunk_size, device, s.dense, num_outputs);
      splits.push_back(std::move(s));
    }
    plan.levels.push_back(std::move(splits));
  }
  plan.head_inputs = head_inputs;
  plan.head_colors = at::arange(head_inputs, longs);
  plan.head_chunks = make_chunks(head_inputs, chunk_size, device, true, 1);
  return plan;
}

// How one input of a probed op is probed: (colors, probes, num_inputs, SppTuple or None).
using ProbeTuple = std::tuple<at::Tensor, int64_t, int64_t, std::optional<SppTuple>>;

InputProbe make_probe(const ProbeTuple& spec, std::optional<int64_t> chunk_size, int64_t num_outputs) {
  const auto& [colors, probes, num_inputs, spp] = spec;
  InputProbe p;
  p.colors = colors;
  p.probes = probes;
  p.num_inputs = num_inputs;
  if (spp) {
    const auto& [spp_colors, boxes, in_shape, geometry_out, channelwise] = *spp;
    p.spp = SppGeometry{spp_colors, boxes, in_shape, geometry_out, channelwise};
  }
  if (probes > 0) p.chunks = make_chunks(probes, chunk_size, colors.device(), !spp.has_value(), num_outputs);
  return p;
}

// A constant argument of an ATen call as the schema types it. A Python number where the schema
// wants a Tensor is a wrapped number (the dispatcher's Python binding does the same), so type
// promotion is the Python op's.
c10::IValue constant(const py::handle& value, const c10::Argument& arg) {
  if (arg.type()->kind() == c10::TypeKind::TensorType && !THPVariable_Check(value.ptr())) {
    at::Tensor t = at::scalar_to_tensor(torch::jit::toIValue(value, c10::NumberType::get()).toScalar());
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    return t;
  }
  return torch::jit::toIValue(value, arg.type());
}

// (tensors, [(name, overload, [(kind, value) per schema argument], values after it)], output,
// clone_inputs) from hzo_ext/executor.py aten_program; every reference is checked against the
// values before it.
std::shared_ptr<const AtenProgram> make_program(const py::object& spec, int64_t num_inputs, const std::string& label) {
  if (spec.is_none()) return nullptr;
  const auto t = spec.cast<py::tuple>();
  auto p = std::make_shared<AtenProgram>();
  p->tensors = t[0].cast<std::vector<at::Tensor>>();
  int64_t values = num_inputs + static_cast<int64_t>(p->tensors.size());
  auto check = [&](int64_t r) {
    TORCH_CHECK(r >= 0 && r < values, "hzo op executor: ", label, ": an ATen call reads value ", r, " of ", values);
  };
  for (const auto& item : t[1].cast<py::list>()) {
    const auto c = item.cast<py::tuple>();
    const auto name = c[0].cast<std::string>(), overload = c[1].cast<std::string>();
    AtenCall call(c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str()));
    const auto& schema = call.op.schema();
    const auto args = c[2].cast<py::list>();
    TORCH_CHECK(args.size() == schema.arguments().size(), "hzo op executor: ", label, ": ", name, " takes ",
                schema.arguments().size(), " arguments, got ", args.size());
    for (size_t i = 0; i < args.size(); ++i) {
      const auto a = args[i].cast<py::tuple>();
      const auto kind = a[0].cast<std::string>();
      const c10::Argument& formal = schema.arguments()[i];
      AtenArg arg;
      if (kind == "default") {
        TORCH_CHECK(formal.default_value(), "hzo op executor: ", label, ": ", name, " has no default for ",
                    formal.name());
        arg.value = *formal.default_value();
      } else if (kind == "const") {
        arg.value = constant(a[1], formal);
      } else if (kind == "ref") {
        arg.kind = AtenArg::Kind::Ref;
        arg.refs = {a[1].cast<int64_t>()};
        check(arg.refs[0]);
      } else {
        TORCH_CHECK(kind == "refs", "hzo op executor: ", label, ": unknown argument kind '", kind, "'");
        const auto list = formal.type()->cast<c10::ListType>();
        const bool optional = list && list->getElementType()->kind() == c10::TypeKind::OptionalType;
        arg.kind = optional ? AtenArg::Kind::OptionalRefs : AtenArg::Kind::Refs;
        arg.refs = a[1].cast<std::vector<int64_t>>();
        for (int64_t r : arg.refs) {
          if (!(optional && r == -1)) check(r);
        }
      }
      call.args.push_back(std::move(arg));
    }
    call.values_after = c[3].cast<int64_t>();
    TORCH_CHECK(call.values_after >= values + static_cast<int64_t>(schema.returns().size()), "hzo op executor: ",
                label, ": ", name, " gives too few values");
    values = call.values_after;
    p->calls.push_back(std::move(call));
  }
  p->output = t[2].cast<int64_t>();
  check(p->output);
  p->clone_inputs = t[3].cast<bool>();
  return p;
}

const std::vector<std::string> kOpModes{"affine", "elementwise", "elementwise_call", "probed"};
const std::vector<std::string> kArith{"", "add", "sub", "mul"};

}  // namespace

void bind(py::module_& m) {
  py::class_<Node>(m, "ExecNode", "One lowered stage or module of the C++ executor (hzo_ext/executor.py).")
      .def(py::init([](const std::string& kind, const std::vector<std::optional<at::Tensor>>& tensors,
                       const std::vector<int64_t>& ints, const std::vector<double>& floats, std::string text,
                       std::vector<Node> children, py::object callback) {
             return Node::make(kind, tensors_of(tensors), ints, floats, std::move(text), std::move(children),
                               stage_callback(std::move(callback)));
           }),
           py::arg("kind"), py::arg("tensors"), py::arg("ints"), py::arg("floats"), py::arg("text"),
           py::arg("children"), py::arg("callback"))
      .def_property_readonly("foldable", &Node::foldable);

  py::class_<OpStep>(m, "OpStep", "One op of the traced graph as the C++ op-level engine runs it.")
      .def(py::init([](const std::string& mode, std::vector<int64_t> inputs, std::vector<bool> wants,
                       std::vector<bool> folds, std::vector<bool> shared, int64_t output, std::optional<Node> node,
                       const std::string& arith,
                       const py::object& program, py::object call, int64_t act, double alpha, double beta,
                       std::vector<at::Tensor> params, const std::vector<ProbeTuple>& probes,
                       std::optional<int64_t> chunk_size, int64_t num_outputs, std::string label,
                       const py::object& fused, int64_t fused_input) {
             OpStep s;
             const auto it = std::find(kOpModes.begin(), kOpModes.end(), mode);
             TORCH_CHECK(it != kOpModes.end(), "hzo op executor: unknown op mode '", mode, "'");
             s.mode = static_cast<OpMode>(it - kOpModes.begin());
             s.inputs = std::move(inputs);
             s.wants = std::move(wants);
             s.folds = std::move(folds);
             s.shared = std::move(shared);
             s.output = output;
             if (node) s.node = std::move(*node);
             const auto a = std::find(kArith.begin(), kArith.end(), arith);
             TORCH_CHECK(a != kArith.end(), "hzo op executor: unknown arithmetic '", arith, "'");
             s.arith = static_cast<Arith>(a - kArith.begin());
             s.program = make_program(program, static_cast<int64_t>(s.inputs.size()), label);
             s.call = op_callback(std::move(call));
             TORCH_CHECK(node || s.arith != Arith::None || s.program || s.call, "hzo op executor: ", label,
                         " has no way to run");
             s.act = act;
             s.alpha = alpha;
             s.beta = beta;
             s.params = std::move(params);
             for (const auto& p : probes) s.probes.push_back(make_probe(p, chunk_size, num_outputs));
             s.fused = make_program(fused, 3, label);  // (a, target, eps)
             s.fused_input = fused_input;
             s.label = std::move(label);
             return s;
           }),
           py::arg("mode"), py::arg("inputs"), py::arg("wants"), py::arg("folds"), py::arg("shared"), py::arg("output"), py::arg("node"),
           py::arg("arith"), py::arg("program"), py::arg("call"), py::arg("act"), py::arg("alpha"), py::arg("beta"),
           py::arg("params"), py::arg("probes"), py::arg("chunk_size"), py::arg("num_outputs"), py::arg("label"),
           py::arg("fused") = py::none(), py::arg("fused_input") = -1);

  py::class_<OpExecutor>(m, "OpExecutor", "Runs the op-level engine's estimates (hzo_ext/executor.py CppOps).")
      .def(py::init<std::vector<OpStep>, int64_t, int64_t, double, bool>(), py::arg("steps"), py::arg("num_values"),
           py::arg("out_slot"), py::arg("eps"), py::arg("relative"))
      .def("forward", &OpExecutor::forward, py::arg("x"), py::call_guard<py::gil_scoped_release>(),
           "The clean forward: every value (slot 0: x), detached.")
      .def("release", &OpExecutor::release)
      .def(
          "targets",
          [](OpExecutor& self, const at::Tensor& delta_out) {
            OpOutcome o;
            {
              py::gil_scoped_release release;
              o = self.targets(delta_out);
            }
            py::dict d;
            d["failure"] = o.failure;
            d["probes"] = o.probes;
            d["fd_layer_evals"] = o.fd_layer_evals;
            d["splits"] = o.splits;
            d["python_calls"] = o.python_calls;
            py::list grads;
            for (auto& [p, g] : o.grads) grads.append(py::make_tuple(p, g));
            d["grads"] = grads;
            return d;
          },
          py::arg("delta_out"), "Every op's input targets from the output's, and the leaves' gradients.");

  py::class_<Plan>(m, "ExecPlan", "The splits of one input shape, with their probe chunks.")
      .def(py::init(&make_plan), py::arg("levels"), py::arg("head_inputs"), py::arg("chunk_size"),
           py::arg("device"));

  py::class_<Executor>(m, "Executor", "Runs whole HZO estimates of a lowered chain of stages.")
      .def(py::init([](std::vector<Node> stages, const std::vector<std::vector<at::Tensor>>& params,
                       const std::string& loss_kind, std::optional<at::Tensor> weight, int64_t ignore_index,
                       double label_smoothing, int64_t reduction, double eps, bool relative,
                       std::optional<int64_t> chunk_size, bool fast) {
             LossSpec loss;
             loss.kind = loss_kind == "cross_entropy" ? LossKind::CrossEntropy
                         : loss_kind == "mse"         ? LossKind::MSE
                                                      : LossKind::Callback;
             loss.weight = weight ? *weight : at::Tensor();
             loss.ignore_index = ignore_index;
             loss.label_smoothing = label_smoothing;
             loss.reduction = reduction;
             Options options;
             options.eps = eps;
             options.relative = relative;
             options.chunk_size = chunk_size;
             options.fast = fast;
             return std::make_unique<Executor>(std::move(stages), params, loss, options);
           }),
           py::arg("stages"), py::arg("params"), py::arg("loss_kind"), py::arg("weight"), py::arg("ignore_index"),
           py::arg("label_smoothing"), py::arg("reduction"), py::arg("eps"), py::arg("relative"),
           py::arg("chunk_size"), py::arg("fast"))
      .def("forward", &Executor::forward, py::arg("x"), py::call_guard<py::gil_scoped_release>(),
           "Clean forward; returns a_0..a_L (detached).")
      .def_property_readonly("forward_python_calls", &Executor::forward_python_calls)
      .def("release", &Executor::release, "Drops the last forward's activations and graphs.")
      .def(
          "estimate",
          [](Executor& self, const Plan& plan, const at::Tensor& y, py::object per_sample_loss, bool want_loss) {
            LossCallback cb = loss_callback(std::move(per_sample_loss));
            Outcome o;
            {
              py::gil_scoped_release release;
              o = self.estimate(plan, y, cb, want_loss);
            }
            py::dict d;
            d["failure"] = o.failure;
            d["level"] = o.level;
            d["index"] = o.index;
            d["bad"] = o.bad.defined() ? py::cast(o.bad) : py::none();
            d["loss"] = o.loss.defined() ? py::cast(o.loss) : py::none();
            d["loss_evals"] = o.loss_evals;
            d["fd_layer_evals"] = o.fd_layer_evals;
            d["probes"] = o.probes;
            d["splits"] = o.splits;
            d["python_calls"] = o.python_calls;
            d["folded"] = o.folded;
            d["folded_flops"] = o.folded_flops;
            d["stacked"] = o.stacked;
            d["concurrent"] = o.concurrent;
            return d;
          },
          py::arg("plan"), py::arg("y"), py::arg("per_sample_loss"), py::arg("want_loss"),
          "Loss head, splits and leaves on the last forward's activations.");
}

}  // namespace hzo::exec
