// pybind11 binding of the torch-free planner (csrc/core/plan.h):
//   hzo_ext._C.build_plan(sizes, batch, policy, chunk_size, itemsize, probes)
//     sizes: [|a_0|, ..., |a_L|]; policy: "bisect" | "chain" | callable (i, j) -> m;
//     chunk_size: int or None; probes: callable (m, j) -> K or None (dense).
//   -> levels: tuple of tuples of (i, m, j, level, probes, queries, chunks, peak_bytes, dense),
//      the fields of hzo_ext.Split in order (hzo_ext.estimator.build_plan wraps them).
// A callable's own exception propagates as the same Python exception; a result that is not an
// int (bool excluded), or out of range, raises ValueError with the Python planner's message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/plan.h"

namespace py = pybind11;

namespace {

// The int a Python callback returned, or nullopt when it is not a plain int or overflows int64.
std::optional<int64_t> as_int(const py::object& r) {
  if (!PyLong_Check(r.ptr()) || PyBool_Check(r.ptr())) return std::nullopt;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(r.ptr(), &overflow);
  if (overflow != 0) return std::nullopt;
  return static_cast<int64_t>(v);
}

hzo::SplitPolicy policy_from(const py::object& policy) {
  if (py::isinstance<py::str>(policy)) {
    const std::string name = policy.cast<std::string>();
    if (name == "bisect") return hzo::SplitPolicy::bisect();
    if (name == "chain") return hzo::SplitPolicy::chain();
  } else if (PyCallable_Check(policy.ptr())) {
    return hzo::SplitPolicy::custom([policy](int64_t i, int64_t j) -> int64_t {
      const py::object r = policy(i, j);
      const std::optional<int64_t> m = as_int(r);
      if (!m) throw py::value_error(hzo::bad_split_message(py::repr(r).cast<std::string>(), i, j));
      return *m;  // the core checks i < m < j
    });
  }
  throw py::value_error("split must be 'bisect', 'chain' or a callable (i, j) -> m, got " +
                        py::repr(policy).cast<std::string>());
}

py::tuple plan_levels(const std::vector<int64_t>& sizes, int64_t batch, const py::object& policy,
                      std::optional<int64_t> chunk_size, int64_t itemsize, const py::object& probes) {
  hzo::ProbesFn probes_fn;
  if (!probes.is_none()) {
    if (!PyCallable_Check(probes.ptr())) {
      throw py::type_error("probes must be a callable (m, j) -> K or None, got " + py::repr(probes).cast<std::string>());
    }
    probes_fn = [probes](int64_t m, int64_t j) -> int64_t {
      const py::object r = probes(m, j);
      const std::optional<int64_t> k = as_int(r);
      if (!k) throw py::value_error(hzo::bad_probes_message(py::repr(r).cast<std::string>(), m, j));
      return *k;  // the core checks K >= 1
    };
  }
  const hzo::Plan plan = hzo::build_plan(sizes, batch, policy_from(policy), chunk_size, itemsize, probes_fn);
  py::tuple levels(plan.levels.size());
  for (size_t k = 0; k < plan.levels.size(); ++k) {
    const auto& level = plan.levels[k];
    py::tuple splits(level.size());
    for (size_t n = 0; n < level.size(); ++n) {
      const hzo::Split& s = level[n];
      splits[n] = py::make_tuple(s.i, s.m, s.j, s.level, s.probes, s.queries, s.chunks, s.peak_bytes, s.dense);
    }
    levels[k] = std::move(splits);
  }
  return levels;
}

}  // namespace

void init_plan_bindings(py::module_& m) {
  m.def("build_plan", &plan_levels, py::arg("sizes"), py::arg("batch"), py::arg("policy"),
        py::arg("chunk_size") = py::none(), py::arg("itemsize") = 4, py::arg("probes") = py::none(),
        "The tree of splits (csrc/core/plan.h): a tuple of levels, each a tuple of\n"
        "(i, m, j, level, probes, queries, chunks, peak_bytes, dense).");
}
