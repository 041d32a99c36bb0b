// CUDA qk_norm (forward) and the fused in-place qk_norm + rotary embedding: one warp per head row.
#include "common.cuh"

namespace attnkit {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

// 1 / sqrt(stat + eps), stat = mean(x²) (rms) or sum(x²) (l2), from this lane's sum of squares.
__device__ __forceinline__ float inv_norm(float ss, int D, NormMode mode, float eps) {
  ss = warp_sum(ss);
  const float stat = mode == NormMode::kRms ? ss / static_cast<float>(D) : ss;
  return 1.0f / sqrtf(stat + eps);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) norm_kernel(const NormParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows) return;  // whole warps exit together
  const T* x = static_cast<const T*>(p.x) + row * p.D;
  T* y = static_cast<T*>(p.y) + row * p.D;
  float ss = 0.0f;
  for (int d = lane; d < p.D; d += 32) {
    const float v = to_f(x[d]);
    ss += v * v;
  }
  const float inv = inv_norm(ss, p.D, p.mode, p.eps);
  for (int d = lane; d < p.D; d += 32) {
    const float w = p.w != nullptr ? p.w[d] : 1.0f;
    y[d] = from_f<T>(to_f(x[d]) * inv * w);
  }
}

// Rows of q then of k; RoPE pairs (i, i + rot / 2) of the normalised row (rotate_half).
template <typename T>
__global__ void __launch_bounds__(kThreads) norm_rope_kernel(const NormRopeParams p) {
  const int heads = p.H + p.Hk;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.B) * p.T * heads) return;
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.T) * heads));
  const int t = static_cast<int>(row / heads % p.T), h = static_cast<int>(row % heads);
  T* x;
  const float* w;
  if (h < p.H) {
    x = static_cast<T*>(p.q) + b * p.q_sb + t * p.q_st + h * p.q_sh;
    w = p.q_w;
  } else {
    x = static_cast<T*>(p.k) + b * p.k_sb + t * p.k_st + (h - p.H) * p.k_sh;
    w = p.k_w;
  }
  float inv = 1.0f;
  if (p.norm) {
    float ss = 0.0f;
    for (int d = lane; d < p.D; d += 32) {
      const float v = to_f(x[d]);
      ss += v * v;
    }
    inv = inv_norm(ss, p.D, p.mode, p.eps);  // every lane has read the row before any write
  } else {
    w = nullptr;
  }
  const float* c = p.cos + b * p.cs_sb + t * p.cs_st;
  const float* s = p.sin + b * p.cs_sb + t * p.cs_st;
  const int half = p.rot / 2;
  for (int i = lane; i < half; i += 32) {
    const float a = to_f(x[i]) * inv * (w != nullptr ? w[i] : 1.0f);
    const float bb = to_f(x[i + half]) * inv * (w != nullptr ? w[i + half] : 1.0f);
    x[i] = from_f<T>(a * c[i] - bb * s[i]);
    x[i + half] = from_f<T>(bb * c[i + half] + a * s[i + half]);
  }
  for (int d = p.rot + lane; d < p.D; d += 32) {  // dims past the rotary ones: norm only
    x[d] = from_f<T>(to_f(x[d]) * inv * (w != nullptr ? w[d] : 1.0f));
  }
}

}  // namespace

std::string qk_norm(const NormParams& p, std::intptr_t stream) {
  if (p.rows == 0) return std::string();
  const unsigned blocks = static_cast<unsigned>(ceil_div(p.rows, kRowsPerBlock));
  ATTNKIT_DISPATCH_DTYPE(p.dtype, { norm_kernel<scalar_t><<<blocks, kThreads, 0, as_stream(stream)>>>(p); });
  return launch_error("qk_norm");
}

std::string qk_norm_rope(const NormRopeParams& p, std::intptr_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.T * (p.H + p.Hk);
  if (rows == 0) return std::string();
  const unsigned blocks = static_cast<unsigned>(ceil_div(rows, kRowsPerBlock));
  ATTNKIT_DISPATCH_DTYPE(p.dtype, { norm_rope_kernel<scalar_t><<<blocks, kThreads, 0, as_stream(stream)>>>(p); });
  return launch_error("qk_norm_rope");
}

}  // namespace cuda
}  // namespace attnkit
