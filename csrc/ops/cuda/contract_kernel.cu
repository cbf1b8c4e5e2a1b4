#include <cuda_runtime.h>

#include "../../core/hzo_math.h"
#include "acc_type.cuh"
#include "launch.h"

namespace hzo {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

// One warp per output (b, s): lanes stride over the entries the owner map attributes to s and
// the warp reduces with a fixed shuffle tree, so results do not depend on scheduling.
template <typename T>
__global__ void contract_kernel(const T* __restrict__ y, const T* __restrict__ target,
                                const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                                T* __restrict__ out, int64_t K, int64_t B, int64_t Q, int64_t num_inputs,
                                typename Acc<T>::type inv_two_eps) {
  using acc_t = typename Acc<T>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_total = int64_t(gridDim.x) * kWarpsPerBlock;
  const T* y_minus = y + K * B * Q;
  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < B * num_inputs;
       row += warps_total) {
    const int64_t b = row / num_inputs, s = row % num_inputs;
    acc_t acc = 0;
    for (int64_t e = offsets[s] + lane; e < offsets[s + 1]; e += kWarp) {
      const int64_t flat = perm[e];
      const int64_t k = flat / Q, q = flat % Q;
      const int64_t at = (k * B + b) * Q + q;
      acc += contract_term<acc_t>(to_acc(target[b * Q + q]), to_acc(y[at]), to_acc(y_minus[at]));
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) out[row] = from_acc<T>(acc * inv_two_eps);
  }
}

template <typename T>
const char* launch(const void* y, const void* target, const int64_t* perm, const int64_t* offsets, void* out,
                   int64_t K, int64_t B, int64_t Q, int64_t num_inputs, double eps, cudaStream_t stream) {
  const int64_t rows = B * num_inputs;
  if (rows == 0) return nullptr;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  contract_kernel<T><<<grid, kWarp * kWarpsPerBlock, 0, stream>>>(
      static_cast<const T*>(y), static_cast<const T*>(target), perm, offsets, static_cast<T*>(out), K, B, Q,
      num_inputs, static_cast<typename Acc<T>::type>(1.0 / (2.0 * eps)));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_contract(DType dtype, const void* y, const void* target, const int64_t* perm,
                            const int64_t* offsets, void* out, int64_t K, int64_t B, int64_t Q,
                            int64_t num_inputs, double eps, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch<float>(y, target, perm, offsets, out, K, B, Q, num_inputs, eps, s);
    case DType::kFloat64: return launch<double>(y, target, perm, offsets, out, K, B, Q, num_inputs, eps, s);
    case DType::kFloat16: return launch<__half>(y, target, perm, offsets, out, K, B, Q, num_inputs, eps, s);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(y, target, perm, offsets, out, K, B, Q, num_inputs, eps, s);
  }
  return "hzo_ext::contract: unsupported dtype";
}

}  // namespace hzo
