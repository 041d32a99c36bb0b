// Shared device helpers of the CUDA kernels: dtype conversion, 16-byte vector loads, warp
// reductions, launch error reporting. Only CUDA toolkit headers: no torch (see docs/native.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../attnkit_native.h"

namespace attnkit {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct Vec;  // elements per 16-byte vector
template <>
struct Vec<float> {
  static constexpr int kN = 4;
};
template <>
struct Vec<__half> {
  static constexpr int kN = 8;
};
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kN = 8;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One 16-byte load of Vec<T>::kN elements, converted to float. `p` must be 16-byte aligned.
__device__ __forceinline__ void load_vec(const float* p, float* o) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  o[0] = v.x;
  o[1] = v.y;
  o[2] = v.z;
  o[3] = v.w;
}

__device__ __forceinline__ void load_vec(const __half* p, float* o) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load_vec(const __nv_bfloat16* p, float* o) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}

// max that propagates NaN (a NaN score must reach the output, as in the reference).
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// Reductions over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp
// must take part.
__device__ __forceinline__ float group_sum(float x, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float warp_sum(float x) { return group_sum(x, 32); }

__device__ __forceinline__ float warp_max(float x) {
  for (int off = 16; off > 0; off >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

inline std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return std::string();
  return std::string(what) + ": " + cudaGetErrorString(err);
}

inline cudaStream_t as_stream(std::intptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Internal: the split-KV attention launcher shared by attention_decode and Loki (attend.cu).
std::string launch_attend(const AttendParams& p, const Workspace& ws, cudaStream_t stream);

}  // namespace cuda
}  // namespace attnkit

// Calls `body` with `scalar_t` bound to the CUDA type of `dtype`.
#define ATTNKIT_DISPATCH_DTYPE(dtype, ...)                 \
  switch (dtype) {                                          \
    case ::attnkit::DType::kFloat32: {                      \
      using scalar_t = float;                               \
      __VA_ARGS__;                                          \
      break;                                                \
    }                                                       \
    case ::attnkit::DType::kFloat16: {                      \
      using scalar_t = __half;                              \
      __VA_ARGS__;                                          \
      break;                                                \
    }                                                       \
    case ::attnkit::DType::kBFloat16: {                     \
      using scalar_t = __nv_bfloat16;                       \
      __VA_ARGS__;                                          \
      break;                                                \
    }                                                       \
  }
