// Bridge between the CUDA op wrappers (ops_cuda.cpp, which see tensors) and the kernels (*.cu,
// which see raw pointers only and include no torch header, so nvcc compiles them quickly).
#pragma once

#include <cstdint>

#include "../../core/elementwise.h"
#include "../../core/hzo_math.h"

namespace hzo {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Each returns nullptr on success, else the CUDA error string of the launch.
const char* launch_perturb(DType dtype, const void* a, const int64_t* colors, const int64_t* probe_ids,
                           void* out, int64_t K, int64_t B, int64_t N, double eps, void* stream);

// perm/offsets: the owner map grouped by input coordinate (see checks.h, OwnerCsr).
const char* launch_contract(DType dtype, const void* y, const void* target, const int64_t* perm,
                            const int64_t* offsets, void* out, int64_t K, int64_t B, int64_t Q,
                            int64_t num_inputs, double eps, void* stream);

// g.lo / g.hi point to device memory (the boxes tensor).
const char* launch_contract_spp(DType dtype, const void* y, const void* target, const int64_t* colors,
                                const BoxGeometry& g, void* out, int64_t K, int64_t B, int64_t probe_start,
                                double eps, void* stream);

// The fused probes (see ops.cpp); wt is the weight transposed, [K, Q] contiguous.
const char* launch_probe_elementwise(DType dtype, const void* z, const void* target, void* out, int64_t n,
                                     double eps, int64_t act, double alpha, double beta, void* stream);
const char* launch_probe_linear(DType dtype, const void* z, const void* wt, const void* target, void* out,
                                int64_t B, int64_t Q, int64_t K, double eps, int64_t act, double alpha, double beta,
                                void* stream);

const char* launch_probe_conv2d(DType dtype, const void* z, const void* weight, const void* target, void* out,
                                const ConvGeometry& g, double eps, int64_t act, double alpha, double beta,
                                void* stream);

}  // namespace hzo
