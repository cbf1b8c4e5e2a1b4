// CUDA kernels of the fused probes; the per-element math is csrc/core/elementwise.h, shared with
// the CPU loops (csrc/ops/cpu/probe_kernel.cpp).
#include <cuda_runtime.h>

#include "../../core/elementwise.h"
#include "acc_type.cuh"
#include "launch.h"

namespace hzo {
namespace {

template <typename T>
__global__ void probe_elementwise_kernel(const T* __restrict__ z, const T* __restrict__ target, T* __restrict__ out,
                                         int64_t n, typename Acc<T>::type eps, int64_t act,
                                         typename Acc<T>::type alpha, typename Acc<T>::type beta) {
  using acc_t = typename Acc<T>::type;
  const acc_t inv = acc_t(1) / (acc_t(2) * eps);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = from_acc<T>(fused_term<acc_t>(act, to_acc(target[i]), to_acc(z[i]), eps, alpha, beta) * inv);
  }
}

// One thread per output (b, k), summing over q in a fixed order (deterministic, like the CPU loop).
template <typename T>
__global__ void probe_linear_kernel(const T* __restrict__ z, const T* __restrict__ wt, const T* __restrict__ target,
                                    T* __restrict__ out, int64_t B, int64_t Q, int64_t K, typename Acc<T>::type eps,
                                    int64_t act, typename Acc<T>::type alpha, typename Acc<T>::type beta) {
  using acc_t = typename Acc<T>::type;
  const acc_t inv = acc_t(1) / (acc_t(2) * eps);
  for (int64_t bk = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; bk < B * K;
       bk += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = bk / K, k = bk % K;
    acc_t acc = 0;
    for (int64_t q = 0; q < Q; ++q) {
      acc += fused_term<acc_t>(act, to_acc(target[b * Q + q]), to_acc(z[b * Q + q]), eps * to_acc(wt[k * Q + q]),
                               alpha, beta);
    }
    out[bk] = from_acc<T>(acc * inv);
  }
}

// One thread per input element (b, c, iy, ix): the sum over its outputs in a fixed order.
template <typename T>
__global__ void probe_conv2d_kernel(const T* __restrict__ z, const T* __restrict__ weight,
                                    const T* __restrict__ target, T* __restrict__ out, ConvGeometry g,
                                    typename Acc<T>::type eps, int64_t act, typename Acc<T>::type alpha,
                                    typename Acc<T>::type beta) {
  using acc_t = typename Acc<T>::type;
  const acc_t inv = acc_t(1) / (acc_t(2) * eps);
  const int64_t n = g.B * g.Cin * g.H * g.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ix = i % g.W, iy = (i / g.W) % g.H, c = (i / (g.W * g.H)) % g.Cin, b = i / (g.W * g.H * g.Cin);
    const acc_t v = conv_probe_input<acc_t>(z, weight, target, g, b, c, iy, ix, act, eps, alpha, beta,
                                            [](T x) { return to_acc(x); });
    out[i] = from_acc<T>(v * inv);
  }
}

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* elementwise(const void* z, const void* target, void* out, int64_t n, double eps, int64_t act,
                        double alpha, double beta, cudaStream_t s) {
  if (n == 0) return nullptr;
  using acc_t = typename Acc<T>::type;
  probe_elementwise_kernel<T><<<grid_for(n, 256), 256, 0, s>>>(
      static_cast<const T*>(z), static_cast<const T*>(target), static_cast<T*>(out), n, static_cast<acc_t>(eps), act,
      static_cast<acc_t>(alpha), static_cast<acc_t>(beta));
  return last_error();
}

template <typename T>
const char* linear(const void* z, const void* wt, const void* target, void* out, int64_t B, int64_t Q, int64_t K,
                   double eps, int64_t act, double alpha, double beta, cudaStream_t s) {
  if (B * K == 0) return nullptr;
  using acc_t = typename Acc<T>::type;
  probe_linear_kernel<T><<<grid_for(B * K, 128), 128, 0, s>>>(
      static_cast<const T*>(z), static_cast<const T*>(wt), static_cast<const T*>(target), static_cast<T*>(out), B, Q,
      K, static_cast<acc_t>(eps), act, static_cast<acc_t>(alpha), static_cast<acc_t>(beta));
  return last_error();
}

template <typename T>
const char* conv2d(const void* z, const void* weight, const void* target, void* out, const ConvGeometry& g,
                   double eps, int64_t act, double alpha, double beta, cudaStream_t s) {
  const int64_t n = g.B * g.Cin * g.H * g.W;
  if (n == 0) return nullptr;
  using acc_t = typename Acc<T>::type;
  probe_conv2d_kernel<T><<<grid_for(n, 128), 128, 0, s>>>(
      static_cast<const T*>(z), static_cast<const T*>(weight), static_cast<const T*>(target), static_cast<T*>(out), g,
      static_cast<acc_t>(eps), act, static_cast<acc_t>(alpha), static_cast<acc_t>(beta));
  return last_error();
}

}  // namespace

const char* launch_probe_conv2d(DType dtype, const void* z, const void* weight, const void* target, void* out,
                                const ConvGeometry& g, double eps, int64_t act, double alpha, double beta,
                                void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return conv2d<float>(z, weight, target, out, g, eps, act, alpha, beta, s);
    case DType::kFloat64: return conv2d<double>(z, weight, target, out, g, eps, act, alpha, beta, s);
    case DType::kFloat16: return conv2d<__half>(z, weight, target, out, g, eps, act, alpha, beta, s);
    case DType::kBFloat16: return conv2d<__nv_bfloat16>(z, weight, target, out, g, eps, act, alpha, beta, s);
  }
  return "hzo_ext::probe_conv2d: unsupported dtype";
}

const char* launch_probe_elementwise(DType dtype, const void* z, const void* target, void* out, int64_t n,
                                     double eps, int64_t act, double alpha, double beta, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return elementwise<float>(z, target, out, n, eps, act, alpha, beta, s);
    case DType::kFloat64: return elementwise<double>(z, target, out, n, eps, act, alpha, beta, s);
    case DType::kFloat16: return elementwise<__half>(z, target, out, n, eps, act, alpha, beta, s);
    case DType::kBFloat16: return elementwise<__nv_bfloat16>(z, target, out, n, eps, act, alpha, beta, s);
  }
  return "hzo_ext::probe_elementwise: unsupported dtype";
}

const char* launch_probe_linear(DType dtype, const void* z, const void* wt, const void* target, void* out,
                                int64_t B, int64_t Q, int64_t K, double eps, int64_t act, double alpha, double beta,
                                void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return linear<float>(z, wt, target, out, B, Q, K, eps, act, alpha, beta, s);
    case DType::kFloat64: return linear<double>(z, wt, target, out, B, Q, K, eps, act, alpha, beta, s);
    case DType::kFloat16: return linear<__half>(z, wt, target, out, B, Q, K, eps, act, alpha, beta, s);
    case DType::kBFloat16: return linear<__nv_bfloat16>(z, wt, target, out, B, Q, K, eps, act, alpha, beta, s);
  }
  return "hzo_ext::probe_linear: unsupported dtype";
}

}  // namespace hzo
