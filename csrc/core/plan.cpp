#include "plan.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <utility>

namespace hzo {
namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

// Products and sums of validated, non-negative counts.
int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  if (a != 0 && b > kMax / a) throw std::overflow_error(std::string(what) + " overflows int64");
  return a * b;
}

int64_t checked_add(int64_t a, int64_t b, const char* what) {
  if (b > kMax - a) throw std::overflow_error(std::string(what) + " overflows int64");
  return a + b;
}

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

}  // namespace

std::string bad_split_message(const std::string& m_repr, int64_t i, int64_t j) {
  return "split policy returned m=" + m_repr + " for the range (" + std::to_string(i) + ", " + std::to_string(j) +
         "]; it must be an int with " + std::to_string(i) + " < m < " + std::to_string(j);
}

std::string bad_probes_message(const std::string& k_repr, int64_t m, int64_t j) {
  return "probes(m, j) returned " + k_repr + " for m=" + std::to_string(m) + ", j=" + std::to_string(j) +
         "; it must be an int >= 1";
}

SplitPolicy SplitPolicy::custom(SplitFn fn) {
  if (!fn) fail("a custom split policy needs a function (i, j) -> m");
  return SplitPolicy(Kind::kCustom, std::move(fn));
}

int64_t SplitPolicy::choose(int64_t i, int64_t j) const {
  switch (kind_) {
    case Kind::kBisect:
      return j - (j - i) / 2;  // the shorter half on the right
    case Kind::kChain:
      return j - 1;
    case Kind::kCustom:
      break;
  }
  const int64_t m = fn_(i, j);
  if (!(i < m && m < j)) fail(bad_split_message(std::to_string(m), i, j));
  return m;
}

Plan build_plan(const std::vector<int64_t>& sizes, int64_t batch, const SplitPolicy& policy,
                std::optional<int64_t> chunk_size, int64_t itemsize, const ProbesFn& probes) {
  if (sizes.empty()) fail("sizes must hold the per-sample sizes of a_0 .. a_L (at least a_0), got none");
  for (size_t l = 0; l < sizes.size(); ++l) {
    if (sizes[l] < 1) {
      fail("the per-sample size of a_" + std::to_string(l) + " must be >= 1, got " + std::to_string(sizes[l]));
    }
  }
  if (batch < 1) fail("batch must be >= 1, got " + std::to_string(batch));
  if (chunk_size && *chunk_size < 1) fail("chunk_size must be >= 1 or None, got " + std::to_string(*chunk_size));
  if (itemsize < 1) fail("itemsize must be >= 1, got " + std::to_string(itemsize));

  Plan plan;
  plan.sizes = sizes;
  plan.batch = batch;
  plan.itemsize = itemsize;
  plan.chunk_size = chunk_size;

  const int64_t L = static_cast<int64_t>(sizes.size()) - 1;
  std::vector<std::pair<int64_t, int64_t>> ranges{{0, L}}, next;
  for (int64_t level = 0; !ranges.empty(); ++level) {
    std::vector<Split> here;
    next.clear();
    for (const auto& [i, j] : ranges) {
      if (j - i < 2) continue;
      Split s;
      s.i = i;
      s.j = j;
      s.level = level;
      s.m = policy.choose(i, j);
      const int64_t m = s.m;
      s.probes = probes ? probes(m, j) : sizes[m];
      if (s.probes < 1) fail(bad_probes_message(std::to_string(s.probes), m, j));
      s.queries = checked_mul(checked_mul(2, s.probes, "queries"), j - m, "queries");
      const int64_t c = chunk_size ? std::min(s.probes, *chunk_size) : s.probes;
      s.chunks = s.probes / c + (s.probes % c != 0);
      int64_t widest = 0;  // the largest input + output pair of a right stage
      for (int64_t l = m + 1; l <= j; ++l) widest = std::max(widest, checked_add(sizes[l - 1], sizes[l], "sizes"));
      const int64_t rows = checked_mul(checked_mul(2, c, "rows"), batch, "rows");
      s.peak_bytes = checked_mul(checked_mul(itemsize, rows, "peak_bytes"),
                                 checked_add(sizes[m], widest, "peak_bytes"), "peak_bytes");
      s.dense = s.probes == sizes[m];

      plan.num_splits += 1;
      plan.fd_layer_evals = checked_add(plan.fd_layer_evals, s.queries, "fd_layer_evals");
      plan.probes = checked_add(plan.probes, s.probes, "probes");
      plan.peak_query_bytes = std::max(plan.peak_query_bytes, s.peak_bytes);
      here.push_back(s);
      next.emplace_back(i, m);
      next.emplace_back(m, j);
    }
    if (!here.empty()) plan.levels.push_back(std::move(here));
    std::swap(ranges, next);
  }
  return plan;
}

}  // namespace hzo
