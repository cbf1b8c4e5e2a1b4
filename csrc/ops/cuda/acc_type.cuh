// Accumulation type of the CUDA kernels: float16/bfloat16 compute in float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hzo {

template <typename T>
struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

}  // namespace hzo
