// Per-element math of the hzo_ext ops, shared by the CPU loops and the CUDA kernels.
// Torch-free: raw pointers and plain integers only, so cpp_tests can exercise it alone.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define HZO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HZO_HOST_DEVICE inline
#endif

namespace hzo {

// Index layout of perturb's output [2, K, B, N] (N = prod(S)), flattened.
struct PerturbIndex {
  int64_t side;   // 0: +eps copy, 1: -eps copy
  int64_t probe;  // k
  int64_t row;    // b
  int64_t coord;  // i in [0, N)
};

HZO_HOST_DEVICE PerturbIndex unravel_perturb(int64_t flat, int64_t K, int64_t B, int64_t N) {
  PerturbIndex ix;
  ix.coord = flat % N;
  flat /= N;
  ix.row = flat % B;
  flat /= B;
  ix.probe = flat % K;
  ix.side = flat / K;
  return ix;
}

// Value of one element of a perturbed copy: a + eps (side 0) or a - eps (side 1) when the
// coordinate's color is the probe's, else a unchanged. Acc is the accumulation type.
template <typename Acc>
HZO_HOST_DEVICE Acc perturbed_value(Acc a, int64_t color, int64_t probe_color, int64_t side, Acc eps) {
  if (color != probe_color) return a;
  return side == 0 ? a + eps : a - eps;
}

// One term of the Jacobian-target contraction, before the 1/(2 eps) scale:
// target * (F(a + eps e) - F(a - eps e)).
template <typename Acc>
HZO_HOST_DEVICE Acc contract_term(Acc target, Acc y_plus, Acc y_minus) {
  return target * (y_plus - y_minus);
}

// One batch row of contract, as the CPU kernel runs it:
// acc_row[owner[k, q]] += target_row[q] * (y[0, k, b, q] - y[1, k, b, q]) for owner >= 0,
// visiting (k, q) in increasing flat order, so the sum order of every output is fixed.
// acc_row has num_inputs entries, zeroed by the caller, who applies the 1/(2 eps) scale once.
// Consecutive entries with the same owner (all of a dense probe's outputs, an SPP footprint
// row) are summed in a register first: a read-modify-write of acc_row per entry would chain
// every add through store-to-load forwarding.
template <typename T, typename Acc>
inline void contract_row(const T* y, const T* target_row, const int64_t* owner, int64_t K, int64_t B,
                         int64_t Q, int64_t b, Acc* acc_row) {
  const T* y_plus = y;
  const T* y_minus = y + K * B * Q;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t* own = owner + k * Q;
    const T* yp = y_plus + (k * B + b) * Q;
    const T* ym = y_minus + (k * B + b) * Q;
    int64_t run_owner = -1;
    Acc run = 0;
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t s = own[q];
      if (s != run_owner) {
        if (run_owner >= 0) acc_row[run_owner] += run;
        run_owner = s;
        run = 0;
      }
      if (s >= 0) {
        run += contract_term<Acc>(static_cast<Acc>(target_row[q]), static_cast<Acc>(yp[q]),
                                  static_cast<Acc>(ym[q]));
      }
    }
    if (run_owner >= 0) acc_row[run_owner] += run;
  }
}

}  // namespace hzo
