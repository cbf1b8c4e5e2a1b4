// GoogleTest on the elementwise functions of the fused probes (csrc/core/elementwise.h).
#include <gtest/gtest.h>

#include <cmath>

#include "core/elementwise.h"

namespace {

using hzo::Act;

double act(Act a, double x, double alpha = 0, double beta = 0) {
  return hzo::act_value<double>(static_cast<int64_t>(a), x, alpha, beta);
}

TEST(ActValue, MatchesClosedForms) {
  for (double x : {-3.0, -0.7, 0.0, 0.4, 2.5}) {
    EXPECT_DOUBLE_EQ(act(Act::kIdentity, x), x);
    EXPECT_DOUBLE_EQ(act(Act::kRelu, x), x > 0 ? x : 0);
    EXPECT_DOUBLE_EQ(act(Act::kLeakyRelu, x, 0.1), x > 0 ? x : 0.1 * x);
    EXPECT_NEAR(act(Act::kGelu, x), 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))), 1e-15);
    EXPECT_NEAR(act(Act::kTanh, x), std::tanh(x), 1e-15);
    EXPECT_NEAR(act(Act::kSigmoid, x), 1 / (1 + std::exp(-x)), 1e-15);
    EXPECT_NEAR(act(Act::kSilu, x), x / (1 + std::exp(-x)), 1e-15);
    EXPECT_DOUBLE_EQ(act(Act::kHardtanh, x, 0.0, 6.0), std::fmin(std::fmax(x, 0.0), 6.0));
    EXPECT_NEAR(act(Act::kElu, x, 1.0), x > 0 ? x : std::exp(x) - 1, 1e-15);
    EXPECT_NEAR(act(Act::kHardswish, x), x * std::fmin(std::fmax(x + 3, 0.0), 6.0) / 6, 1e-15);
    EXPECT_NEAR(act(Act::kHardsigmoid, x), std::fmin(std::fmax(x / 6 + 0.5, 0.0), 1.0), 1e-15);
    EXPECT_NEAR(act(Act::kSoftplus, x, 1.0, 20.0), std::log1p(std::exp(x)), 1e-15);
  }
  EXPECT_DOUBLE_EQ(act(Act::kSoftplus, 30.0, 1.0, 20.0), 30.0);  // above the threshold: linear
}

TEST(FusedTerm, IsTheContractedCentralDifference) {
  // target * (s(z + h) - s(z - h)); for ReLU across the kink at z = 0.1, h = 0.3: 0.4 - 0 = 0.4
  EXPECT_DOUBLE_EQ(hzo::fused_term<double>(static_cast<int64_t>(Act::kRelu), 2.0, 0.1, 0.3, 0, 0), 2.0 * 0.4);
  // identity: exactly 2 h target (the fold of an affine piece)
  EXPECT_DOUBLE_EQ(hzo::fused_term<double>(static_cast<int64_t>(Act::kIdentity), 1.5, 7.0, 0.25, 0, 0), 0.75);
  // smooth s: (s(z+h) - s(z-h)) / 2h -> s'(z)
  const double h = 1e-5, z = 0.3;
  const double d = hzo::fused_term<double>(static_cast<int64_t>(Act::kTanh), 1.0, z, h, 0, 0) / (2 * h);
  EXPECT_NEAR(d, 1 - std::tanh(z) * std::tanh(z), 1e-9);
}

}  // namespace
