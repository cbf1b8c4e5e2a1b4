// The HZO planner: the tree of splits of a chain of L stages, level by level, with probes,
// queries and predicted query memory per split. Torch-free (std only): it plans from the
// per-sample activation sizes |a_0| .. |a_L| alone, so cpp_tests exercise it without torch and
// the Python package (hzo_ext.build_plan) and any executor share one plan.
//
// Semantics (those of hzo_ext.estimator.build_plan, docs/planner.md):
//   - ranges (i, j] with j - i >= 2 are split at m (policy), top down, breadth first: level k
//     holds the splits of depth k in the tree, left before right; children (i, m], (m, j].
//   - probes K = probes(m, j) (default dense: |a_m|); queries = 2 K (j - m);
//     chunk c = min(K, chunk_size) probes per batched query, chunks = ceil(K / c);
//     peak_bytes = itemsize * 2 c B * (|a_m| + max over l in (m, j] of |a_{l-1}| + |a_l|);
//     dense = (K == |a_m|).
// All counts are int64: at depth 4096 and width 10^4 the total queries of bisect are about
// M L log2 L = 5e8, far below 2^63; every product is overflow-checked anyway
// (std::overflow_error) because sizes and batch come from the user.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace hzo {

// Range (i, j] split at m; the right sub-network f_j o ... o f_{m+1} is probed on a_m.
struct Split {
  int64_t i = 0, m = 0, j = 0;
  int64_t level = 0;
  int64_t probes = 0;      // K: +-eps pairs
  int64_t queries = 0;     // 2 K (j - m): one stage on one perturbed copy of the batch
  int64_t chunks = 0;      // batched queries: ceil(K / c)
  int64_t peak_bytes = 0;  // the query tensors of one chunk (see above)
  bool dense = true;       // K == |a_m| (false: SPP coloring)
};

struct Plan {
  std::vector<int64_t> sizes;  // |a_0| .. |a_L| per sample
  int64_t batch = 0;
  int64_t itemsize = 0;
  std::optional<int64_t> chunk_size;
  std::vector<std::vector<Split>> levels;  // levels[k]: independent splits
  // Totals over all splits.
  int64_t num_splits = 0;
  int64_t fd_layer_evals = 0;    // sum of queries
  int64_t probes = 0;            // sum of probes
  int64_t peak_query_bytes = 0;  // max of peak_bytes (0 when there are no splits)

  int64_t num_stages() const { return static_cast<int64_t>(sizes.size()) - 1; }
};

// (i, j) -> m for a custom policy; must satisfy i < m < j.
using SplitFn = std::function<int64_t(int64_t i, int64_t j)>;
// (m, j) -> K, the probes of split (m, j] (e.g. the colors of an SPP coloring); must be >= 1.
using ProbesFn = std::function<int64_t(int64_t m, int64_t j)>;

class SplitPolicy {
 public:
  enum class Kind { kBisect, kChain, kCustom };

  static SplitPolicy bisect() { return SplitPolicy(Kind::kBisect, nullptr); }
  static SplitPolicy chain() { return SplitPolicy(Kind::kChain, nullptr); }
  static SplitPolicy custom(SplitFn fn);  // throws std::invalid_argument when fn is empty

  Kind kind() const { return kind_; }
  // m for the range (i, j], j - i >= 2: bisect j - (j - i) / 2 (the shorter half on the
  // right), chain j - 1, custom fn(i, j) validated i < m < j (std::invalid_argument naming the
  // range otherwise). Exceptions thrown by fn propagate unchanged.
  int64_t choose(int64_t i, int64_t j) const;

 private:
  SplitPolicy(Kind kind, SplitFn fn) : kind_(kind), fn_(std::move(fn)) {}
  Kind kind_;
  SplitFn fn_;
};

// The messages for a custom split m outside (i, j) and for a probe count K < 1, shared by the
// core and the bindings (which also refuse non-int results with them).
std::string bad_split_message(const std::string& m_repr, int64_t i, int64_t j);
std::string bad_probes_message(const std::string& k_repr, int64_t m, int64_t j);

// Plans the splits of a chain with per-sample sizes |a_0| .. |a_L| (at least one entry, all
// >= 1), batch >= 1, chunk_size >= 1 or none (all probes of a split at once), itemsize >= 1.
// Throws std::invalid_argument for bad arguments or a bad custom split / probe count, and
// std::overflow_error if a count does not fit in int64. Exceptions from the callbacks
// propagate unchanged.
Plan build_plan(const std::vector<int64_t>& sizes, int64_t batch, const SplitPolicy& policy,
                std::optional<int64_t> chunk_size = std::nullopt, int64_t itemsize = 4,
                const ProbesFn& probes = nullptr);

}  // namespace hzo
