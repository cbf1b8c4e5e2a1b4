// GoogleTest on the planner (csrc/core/plan.h): its counts against an independent recursion
// over the tree of splits, written here, for depths 1 to 4096, bisect, chain and custom policies;
// the closed forms for uniform width; validation; chunked peak memory.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "core/plan.h"

namespace {

using Fn = std::function<int64_t(int64_t, int64_t)>;

// The definition, recursively: split (i, j] at m, K probes, 2K(j - m) queries, recurse on
// (i, m] and (m, j]. height = number of tree levels that hold a split.
struct Count {
  int64_t fd = 0, probes = 0, splits = 0, height = 0;
};

Count count(const std::vector<int64_t>& sizes, const Fn& split, const Fn& probes, int64_t i, int64_t j) {
  if (j - i < 2) return {};
  const int64_t m = split(i, j);
  const int64_t K = probes ? probes(m, j) : sizes[m];
  const Count left = count(sizes, split, probes, i, m), right = count(sizes, split, probes, m, j);
  return {2 * K * (j - m) + left.fd + right.fd, K + left.probes + right.probes, 1 + left.splits + right.splits,
          1 + std::max(left.height, right.height)};
}

const Fn kBisect = [](int64_t i, int64_t j) { return j - (j - i) / 2; };
const Fn kChain = [](int64_t, int64_t j) { return j - 1; };

// Non-uniform widths, so a wrong index (m vs j, l vs l - 1) changes the counts.
std::vector<int64_t> widths(int64_t L) {
  std::vector<int64_t> s(L + 1);
  for (int64_t l = 0; l <= L; ++l) s[l] = 3 + (l * 5) % 7;
  return s;
}

// Checks the plan's totals and structure against the recursion.
void expect_matches(const hzo::Plan& plan, const std::vector<int64_t>& sizes, const Fn& split, const Fn& probes,
                    const std::string& what) {
  const int64_t L = static_cast<int64_t>(sizes.size()) - 1;
  const Count want = count(sizes, split, probes, 0, L);
  ASSERT_EQ(plan.fd_layer_evals, want.fd) << what;
  ASSERT_EQ(plan.probes, want.probes) << what;
  ASSERT_EQ(plan.num_splits, want.splits) << what;
  ASSERT_EQ(plan.num_splits, std::max<int64_t>(L - 1, 0)) << what;  // a full binary tree over L leaves
  ASSERT_EQ(static_cast<int64_t>(plan.levels.size()), want.height) << what;
  // Every split needs delta_j from an earlier level; every stage but the last gets its target once.
  std::vector<int> known(L + 1, 0);
  known[L] = 1;
  int64_t fd = 0, peak = 0;
  for (size_t k = 0; k < plan.levels.size(); ++k) {
    for (const hzo::Split& s : plan.levels[k]) {
      ASSERT_EQ(s.level, static_cast<int64_t>(k)) << what;
      ASSERT_TRUE(s.i < s.m && s.m < s.j) << what;
      ASSERT_EQ(known[s.j], 1) << what << " split (" << s.i << ", " << s.m << ", " << s.j << "]";
      ASSERT_EQ(s.queries, 2 * s.probes * (s.j - s.m)) << what;
      fd += s.queries;
      peak = std::max(peak, s.peak_bytes);
    }
    for (const hzo::Split& s : plan.levels[k]) known[s.m] += 1;
  }
  for (int64_t l = 1; l <= L; ++l) ASSERT_EQ(known[l], 1) << what << " stage " << l;
  ASSERT_EQ(fd, plan.fd_layer_evals) << what;
  ASSERT_EQ(peak, plan.peak_query_bytes) << what;
}

TEST(Plan, BisectAndChainMatchRecursionForDepths1To4096) {
  for (int64_t L = 1; L <= 4096; ++L) {
    const std::vector<int64_t> sizes = widths(L);
    const hzo::Plan bisect = hzo::build_plan(sizes, 2, hzo::SplitPolicy::bisect());
    expect_matches(bisect, sizes, kBisect, nullptr, "bisect L=" + std::to_string(L));
    ASSERT_EQ(static_cast<int64_t>(bisect.levels.size()), static_cast<int64_t>(std::ceil(std::log2(L))));
    const hzo::Plan chain = hzo::build_plan(sizes, 2, hzo::SplitPolicy::chain());
    expect_matches(chain, sizes, kChain, nullptr, "chain L=" + std::to_string(L));
    ASSERT_EQ(static_cast<int64_t>(chain.levels.size()), L - 1);
  }
}

TEST(Plan, UniformWidthClosedForms) {
  const int64_t M = 16;
  for (int64_t k = 0; k <= 12; ++k) {
    const int64_t L = int64_t{1} << k;
    const std::vector<int64_t> sizes(L + 1, M);
    EXPECT_EQ(hzo::build_plan(sizes, 8, hzo::SplitPolicy::bisect()).fd_layer_evals, M * L * k) << "L=" << L;
    EXPECT_EQ(hzo::build_plan(sizes, 8, hzo::SplitPolicy::chain()).fd_layer_evals, 2 * M * (L - 1)) << "L=" << L;
  }
  // Depth 4096, width 10^4: bisect's M L log2 L = 4.9e8 queries, no overflow in int64.
  const std::vector<int64_t> wide(4097, 10000);
  EXPECT_EQ(hzo::build_plan(wide, 64, hzo::SplitPolicy::bisect()).fd_layer_evals, int64_t{10000} * 4096 * 12);
}

TEST(Plan, CustomPoliciesMatchRecursion) {
  const Fn first = [](int64_t i, int64_t) { return i + 1; };  // long right halves: L - 1 levels
  // A random valid split, deterministic in (i, j) (the recursion must see the same m).
  const Fn random = [](int64_t i, int64_t j) {
    uint64_t h = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ULL ^ static_cast<uint64_t>(j) * 0xC2B2AE3D27D4EB4FULL;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 29;
    return i + 1 + static_cast<int64_t>(h % static_cast<uint64_t>(j - i - 1));
  };
  for (int64_t L = 1; L <= 600; ++L) {
    const std::vector<int64_t> sizes = widths(L);
    const hzo::Plan p = hzo::build_plan(sizes, 3, hzo::SplitPolicy::custom(first));
    expect_matches(p, sizes, first, nullptr, "first L=" + std::to_string(L));
    ASSERT_EQ(static_cast<int64_t>(p.levels.size()), std::max<int64_t>(L - 1, 0));
  }
  for (int64_t L = 1; L <= 4096; L += (L < 64 ? 1 : 37)) {
    const std::vector<int64_t> sizes = widths(L);
    expect_matches(hzo::build_plan(sizes, 3, hzo::SplitPolicy::custom(random)), sizes, random, nullptr,
                   "random L=" + std::to_string(L));
  }
}

TEST(Plan, ProbesCallbackSetsCountsAndDenseFlag) {
  const std::vector<int64_t> sizes = widths(37);
  const Fn probes = [&](int64_t m, int64_t j) { return (m + j) % 3 == 0 ? sizes[m] : 1 + (m + j) % 2; };
  const hzo::Plan p = hzo::build_plan(sizes, 4, hzo::SplitPolicy::bisect(), std::nullopt, 4, probes);
  expect_matches(p, sizes, kBisect, probes, "colored");
  for (const auto& level : p.levels) {
    for (const hzo::Split& s : level) EXPECT_EQ(s.dense, s.probes == sizes[s.m]);
  }
}

TEST(Plan, InvalidCustomSplitThrowsNamingTheRange) {
  const std::vector<int64_t> sizes(9, 4);
  for (const Fn& bad : {Fn([](int64_t i, int64_t) { return i; }), Fn([](int64_t, int64_t j) { return j; }),
                        Fn([](int64_t, int64_t j) { return j + 3; }), Fn([](int64_t i, int64_t) { return i - 1; })}) {
    try {
      hzo::build_plan(sizes, 1, hzo::SplitPolicy::custom(bad));
      FAIL() << "no exception";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("for the range (0, 8]; it must be an int with 0 < m < 8"),
                std::string::npos)
          << e.what();
    }
  }
  // Fine at the top, wrong below: the message names the inner range.
  const Fn inner = [](int64_t, int64_t j) { return j == 8 ? 4 : j; };
  try {
    hzo::build_plan(sizes, 1, hzo::SplitPolicy::custom(inner));
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()), "split policy returned m=4 for the range (0, 4]; it must be an int with 0 < m < 4");
  }
  EXPECT_THROW(hzo::SplitPolicy::custom(nullptr), std::invalid_argument);
}

struct CallbackError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

TEST(Plan, CallbackExceptionsPropagateUnchanged) {
  const std::vector<int64_t> sizes(9, 4);
  const Fn throwing = [](int64_t, int64_t) -> int64_t { throw CallbackError("boom"); };
  EXPECT_THROW(hzo::build_plan(sizes, 1, hzo::SplitPolicy::custom(throwing)), CallbackError);
  EXPECT_THROW(hzo::build_plan(sizes, 1, hzo::SplitPolicy::bisect(), std::nullopt, 4, throwing), CallbackError);
}

TEST(Plan, RefusesBadArguments) {
  const std::vector<int64_t> sizes(5, 4);
  const auto bisect = hzo::SplitPolicy::bisect();
  EXPECT_THROW(hzo::build_plan({}, 1, bisect), std::invalid_argument);
  EXPECT_THROW(hzo::build_plan({4, 0, 4}, 1, bisect), std::invalid_argument);
  EXPECT_THROW(hzo::build_plan(sizes, 0, bisect), std::invalid_argument);
  EXPECT_THROW(hzo::build_plan(sizes, 1, bisect, int64_t{0}), std::invalid_argument);
  EXPECT_THROW(hzo::build_plan(sizes, 1, bisect, std::nullopt, 0), std::invalid_argument);
  const Fn zero = [](int64_t, int64_t) -> int64_t { return 0; };
  EXPECT_THROW(hzo::build_plan(sizes, 1, bisect, std::nullopt, 4, zero), std::invalid_argument);
  // Counts that do not fit in int64 are refused, not wrapped.
  const std::vector<int64_t> huge(3, int64_t{1} << 61);
  EXPECT_THROW(hzo::build_plan(huge, 1, bisect), std::overflow_error);
  // Depth 0 and 1: no splits.
  EXPECT_EQ(hzo::build_plan({4}, 1, bisect).num_splits, 0);
  EXPECT_EQ(hzo::build_plan({4, 5}, 1, bisect).levels.size(), 0u);
  EXPECT_EQ(hzo::build_plan({4, 5}, 1, bisect).peak_query_bytes, 0);
}

TEST(Plan, ChunkedPeakMemory) {
  // L = 4, bisect: top split (0, 2, 4], K = |a_2| = 16 probes; right stages 3, 4 with
  // input + output pairs 16 + 16 and 16 + 8.
  const std::vector<int64_t> sizes{4, 16, 16, 16, 8};
  const int64_t B = 3, itemsize = 8;
  auto top = [&](std::optional<int64_t> chunk) {
    return hzo::build_plan(sizes, B, hzo::SplitPolicy::bisect(), chunk, itemsize).levels.at(0).at(0);
  };
  for (const auto& [chunk, c, chunks] : std::vector<std::tuple<std::optional<int64_t>, int64_t, int64_t>>{
           {std::nullopt, 16, 1}, {int64_t{5}, 5, 4}, {int64_t{8}, 8, 2}, {int64_t{16}, 16, 1}, {int64_t{100}, 16, 1}}) {
    const hzo::Split s = top(chunk);
    EXPECT_EQ(s.m, 2);
    EXPECT_EQ(s.chunks, chunks) << "chunk " << c;
    EXPECT_EQ(s.queries, 2 * 16 * 2);  // chunking does not change the queries
    EXPECT_EQ(s.peak_bytes, itemsize * 2 * c * B * (16 + 32)) << "chunk " << c;
  }
  // Level 1: (0, 1, 2] with K = |a_1| = 16 (right stage 2: 16 + 16) and (2, 3, 4] with K = 16
  // (right stage 4: 16 + 8); chunk 5 -> 30 rows.
  const hzo::Plan p = hzo::build_plan(sizes, B, hzo::SplitPolicy::bisect(), int64_t{5}, itemsize);
  ASSERT_EQ(p.levels.size(), 2u);
  EXPECT_EQ(p.levels[1][0].peak_bytes, itemsize * 30 * (16 + 32));
  EXPECT_EQ(p.levels[1][1].peak_bytes, itemsize * 30 * (16 + 24));
  EXPECT_EQ(p.peak_query_bytes, itemsize * 30 * (16 + 32));
}

}  // namespace
