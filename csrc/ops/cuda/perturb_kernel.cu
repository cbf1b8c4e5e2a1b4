#include <cuda_runtime.h>

#include "../../core/hzo_math.h"
#include "acc_type.cuh"
#include "launch.h"

namespace hzo {
namespace {

template <typename T>
__global__ void perturb_kernel(const T* __restrict__ a, const int64_t* __restrict__ colors,
                               const int64_t* __restrict__ probe_ids, T* __restrict__ out, int64_t K,
                               int64_t B, int64_t N, typename Acc<T>::type eps) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = 2 * K * B * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const PerturbIndex ix = unravel_perturb(i, K, B, N);
    const acc_t v = to_acc(a[ix.row * N + ix.coord]);
    out[i] = from_acc<T>(perturbed_value<acc_t>(v, colors[ix.coord], probe_ids[ix.probe], ix.side, eps));
  }
}

template <typename T>
const char* launch(const void* a, const int64_t* colors, const int64_t* probe_ids, void* out, int64_t K,
                   int64_t B, int64_t N, double eps, cudaStream_t stream) {
  const int64_t total = 2 * K * B * N;
  if (total == 0) return nullptr;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  perturb_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(a), colors, probe_ids,
                                                  static_cast<T*>(out), K, B, N,
                                                  static_cast<typename Acc<T>::type>(eps));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_perturb(DType dtype, const void* a, const int64_t* colors, const int64_t* probe_ids,
                           void* out, int64_t K, int64_t B, int64_t N, double eps, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch<float>(a, colors, probe_ids, out, K, B, N, eps, s);
    case DType::kFloat64: return launch<double>(a, colors, probe_ids, out, K, B, N, eps, s);
    case DType::kFloat16: return launch<__half>(a, colors, probe_ids, out, K, B, N, eps, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, colors, probe_ids, out, K, B, N, eps, s);
  }
  return "hzo_ext::perturb: unsupported dtype";
}

}  // namespace hzo
