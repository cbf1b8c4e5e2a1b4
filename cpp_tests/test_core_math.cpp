// GoogleTest on the torch-free core: the per-element math shared by the CPU and CUDA kernels.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "core/hzo_math.h"

namespace {

TEST(UnravelPerturb, RoundTripsEveryIndex) {
  const int64_t K = 3, B = 4, N = 5;
  for (int64_t flat = 0; flat < 2 * K * B * N; ++flat) {
    const hzo::PerturbIndex ix = hzo::unravel_perturb(flat, K, B, N);
    EXPECT_EQ(((ix.side * K + ix.probe) * B + ix.row) * N + ix.coord, flat);
    EXPECT_GE(ix.side, 0);
    EXPECT_LT(ix.side, 2);
  }
}

TEST(PerturbedValue, MovesOnlyTheProbedColor) {
  EXPECT_DOUBLE_EQ(hzo::perturbed_value<double>(1.5, 2, 2, 0, 0.25), 1.75);
  EXPECT_DOUBLE_EQ(hzo::perturbed_value<double>(1.5, 2, 2, 1, 0.25), 1.25);
  EXPECT_DOUBLE_EQ(hzo::perturbed_value<double>(1.5, 3, 2, 0, 0.25), 1.5);
  EXPECT_DOUBLE_EQ(hzo::perturbed_value<double>(1.5, 3, 2, 1, 0.25), 1.5);
}

TEST(ContractTerm, IsTargetTimesDifference) {
  EXPECT_DOUBLE_EQ(hzo::contract_term<double>(2.0, 5.0, 3.0), 4.0);
  EXPECT_DOUBLE_EQ(hzo::contract_term<double>(-1.0, 5.0, 3.0), -2.0);
}

// contract_row against a direct evaluation of the definition over every (k, b, q).
TEST(ContractRow, MatchesDefinitionWithIgnoredEntries) {
  const int64_t K = 4, B = 3, Q = 6, N = 5;
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> val(-1.0, 1.0);
  std::uniform_int_distribution<int64_t> own(-1, N - 1);
  std::vector<double> y(2 * K * B * Q), target(B * Q);
  std::vector<int64_t> owner(K * Q);
  for (auto& v : y) v = val(rng);
  for (auto& v : target) v = val(rng);
  for (auto& v : owner) v = own(rng);

  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> got(N, 0.0), want(N, 0.0);
    hzo::contract_row<double, double>(y.data(), target.data() + b * Q, owner.data(), K, B, Q, b, got.data());
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t s = owner[k * Q + q];
        if (s < 0) continue;
        const double plus = y[(0 * K * B) + (k * B + b) * Q + q];
        const double minus = y[(1 * K * B) * Q + (k * B + b) * Q + q];
        want[s] += target[b * Q + q] * (plus - minus);
      }
    }
    for (int64_t s = 0; s < N; ++s) EXPECT_NEAR(got[s], want[s], 1e-12) << "b=" << b << " s=" << s;
  }
}

TEST(ContractRow, DenseLinearMapGivesTransposedProduct) {
  // F(a) = W a with dense probes: sum_q target_q (W(a+e_k) - W(a-e_k))_q / 2 = (W^T target)_k.
  const int64_t N = 3, Q = 2, B = 1, K = N;
  const double W[Q][N] = {{1.0, 2.0, 3.0}, {-4.0, 5.0, 0.5}};
  const double a[N] = {0.3, -0.2, 0.1};
  const double target[Q] = {2.0, -1.0};
  std::vector<double> y(2 * K * B * Q);
  std::vector<int64_t> owner(K * Q);
  for (int64_t side = 0; side < 2; ++side) {
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t q = 0; q < Q; ++q) {
        double out = 0;
        for (int64_t i = 0; i < N; ++i) {
          out += W[q][i] * hzo::perturbed_value<double>(a[i], i, k, side, 1.0);
        }
        y[(side * K + k) * Q + q] = out;
        owner[k * Q + q] = k;
      }
    }
  }
  std::vector<double> got(N, 0.0);
  hzo::contract_row<double, double>(y.data(), target, owner.data(), K, B, Q, 0, got.data());
  for (int64_t k = 0; k < N; ++k) EXPECT_NEAR(got[k] / 2.0, W[0][k] * target[0] + W[1][k] * target[1], 1e-12);
}

}  // namespace
