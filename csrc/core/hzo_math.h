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

// ---- SPP contraction with owners computed from the footprint geometry (contract_spp) ----------

// Input [C, *S] of a right sub-network, output [Cout, *T], r <= 3 spatial axes stored
// right-aligned in S[3], T[3] (the leading 3 - r slots have size 1), so the last axis is the
// contiguous one. Position p_a of axis a can change the outputs
// lo[axis_offset[a] + p_a] .. hi[axis_offset[a] + p_a] of that axis (inclusive; lo > hi: none).
// channelwise: output channel c' depends on input channel c' only (pooling, elementwise).
struct BoxGeometry {
  int64_t C = 1, Cout = 1;
  int64_t S[3] = {1, 1, 1};
  int64_t T[3] = {1, 1, 1};
  int64_t axis_offset[3] = {0, 0, 0};
  int rank = 0;
  bool channelwise = false;
  const int64_t* lo = nullptr;
  const int64_t* hi = nullptr;

  HZO_HOST_DEVICE int64_t in_spatial() const { return S[0] * S[1] * S[2]; }
  HZO_HOST_DEVICE int64_t out_features() const { return Cout * T[0] * T[1] * T[2]; }
};

// Sum over the footprint box of input coordinate (c, p) -- every output (c', t) with t_a in
// [lo(p_a), hi(p_a)] on each axis and c' = c when channelwise, else every c' -- of
// target[c', t] * (y_plus[c', t] - y_minus[c', t]), in a fixed order (c', t_0, t_1, t_2).
// The pointers are one (probe, batch row) slice of [Cout, *T]. The coloring guarantees that no
// other input coordinate of the same color has an overlapping box, so this equals contract
// with the owner map, without materialising it. to_acc converts an element to Acc.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Acc, typename T, typename ToAcc>
HZO_HOST_DEVICE Acc box_contract(const T* y_plus, const T* y_minus, const T* target, const BoxGeometry& g,
                                 int64_t c, int64_t p, ToAcc to_acc) {
  int64_t lo[3] = {0, 0, 0}, hi[3] = {0, 0, 0};
  for (int a = 2; a >= 3 - g.rank; --a) {  // unravel p, last axis fastest
    const int64_t pa = p % g.S[a];
    p /= g.S[a];
    lo[a] = g.lo[g.axis_offset[a] + pa];
    hi[a] = g.hi[g.axis_offset[a] + pa];
    if (lo[a] > hi[a]) return Acc(0);
  }
  const int64_t c_begin = g.channelwise ? c : 0, c_end = g.channelwise ? c + 1 : g.Cout;
  Acc acc = 0;
  for (int64_t cc = c_begin; cc < c_end; ++cc) {
    for (int64_t t0 = lo[0]; t0 <= hi[0]; ++t0) {
      for (int64_t t1 = lo[1]; t1 <= hi[1]; ++t1) {
        const int64_t row = ((cc * g.T[0] + t0) * g.T[1] + t1) * g.T[2];
        for (int64_t q = row + lo[2]; q <= row + hi[2]; ++q) {
          acc += contract_term<Acc>(to_acc(target[q]), to_acc(y_plus[q]), to_acc(y_minus[q]));
        }
      }
    }
  }
  return acc;
}

}  // namespace hzo
