// Bridge between the CUDA op wrappers (ops_cuda.cpp, which see tensors) and the kernels (*.cu,
// which see raw pointers only and include no torch header, so nvcc compiles them quickly).
#pragma once

#include <cstdint>

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

}  // namespace hzo
