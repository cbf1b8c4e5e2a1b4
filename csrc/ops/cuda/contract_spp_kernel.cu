#include <cuda_runtime.h>

#include "../../core/hzo_math.h"
#include "acc_type.cuh"
#include "launch.h"

namespace hzo {
namespace {

struct DeviceToAcc {
  template <typename T>
  __device__ __forceinline__ typename Acc<T>::type operator()(T v) const { return to_acc(v); }
};

// One thread per output element (b, c, p): the box sum of input (c, p) under its own probe, in
// a fixed order (box_contract), so no atomics and no dependence on scheduling.
template <typename T>
__global__ void contract_spp_kernel(const T* __restrict__ y, const T* __restrict__ target,
                                    const int64_t* __restrict__ colors, BoxGeometry g, T* __restrict__ out,
                                    int64_t K, int64_t B, int64_t probe_start, typename Acc<T>::type inv_two_eps) {
  using acc_t = typename Acc<T>::type;
  const int64_t P = g.in_spatial(), Q = g.out_features(), N = g.C * P;
  const T* y_minus = y + K * B * Q;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B * N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, coord = i % N;
    const int64_t k = colors[coord] - probe_start;
    acc_t v = 0;
    if (k >= 0 && k < K) {
      const int64_t at = (k * B + b) * Q;
      v = box_contract<acc_t>(y + at, y_minus + at, target + b * Q, g, coord / P, coord % P, DeviceToAcc{}) *
          inv_two_eps;
    }
    out[i] = from_acc<T>(v);
  }
}

template <typename T>
const char* launch(const void* y, const void* target, const int64_t* colors, const BoxGeometry& g, void* out,
                   int64_t K, int64_t B, int64_t probe_start, double eps, cudaStream_t stream) {
  const int64_t total = B * g.C * g.in_spatial();
  if (total == 0) return nullptr;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  contract_spp_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(y), static_cast<const T*>(target), colors, g, static_cast<T*>(out), K, B, probe_start,
      static_cast<typename Acc<T>::type>(1.0 / (2.0 * eps)));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_contract_spp(DType dtype, const void* y, const void* target, const int64_t* colors,
                                const BoxGeometry& g, void* out, int64_t K, int64_t B, int64_t probe_start,
                                double eps, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch<float>(y, target, colors, g, out, K, B, probe_start, eps, s);
    case DType::kFloat64: return launch<double>(y, target, colors, g, out, K, B, probe_start, eps, s);
    case DType::kFloat16: return launch<__half>(y, target, colors, g, out, K, B, probe_start, eps, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(y, target, colors, g, out, K, B, probe_start, eps, s);
  }
  return "hzo_ext::contract_spp: unsupported dtype";
}

}  // namespace hzo
