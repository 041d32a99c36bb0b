// CPU qk_norm (forward) and the fused in-place qk_norm + rotary embedding.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_common.h"

namespace attnkit {
namespace cpu {

namespace {

// y = x * rsqrt(stat + eps) * w, stat = mean(x²) (rms) or sum(x²) (l2); x and y may alias.
inline void norm_row(const float* x, float* y, int D, NormMode mode, float eps, const float* w) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int i = 0; i < D; ++i) ss += x[i] * x[i];
  const float stat = mode == NormMode::kRms ? ss / static_cast<float>(D) : ss;
  const float inv = 1.0f / std::sqrt(stat + eps);
  if (w != nullptr) {
#pragma omp simd
    for (int i = 0; i < D; ++i) y[i] = x[i] * inv * w[i];
  } else {
#pragma omp simd
    for (int i = 0; i < D; ++i) y[i] = x[i] * inv;
  }
}

template <typename T>
void norm(const NormParams& p) {
  at::parallel_for(0, p.rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> x(p.D);
    for (int64_t r = begin; r < end; ++r) {
      load_row(static_cast<const T*>(p.x) + r * p.D, x.data(), p.D);
      norm_row(x.data(), x.data(), p.D, p.mode, p.eps, p.w);
      store_row(x.data(), static_cast<T*>(p.y) + r * p.D, p.D);
    }
  });
}

// One head row in place: optional norm, then RoPE on the first `rot` dims:
// out[i] = y[i] cos[i] - y[i + half] sin[i], out[i + half] = y[i + half] cos[i + half] + y[i] sin[i + half].
template <typename T>
void norm_rope_row(T* row, float* y, const NormRopeParams& p, const float* w, const float* c, const float* s) {
  load_row(row, y, p.D);
  if (p.norm) norm_row(y, y, p.D, p.mode, p.eps, w);
  const int half = p.rot / 2;
  for (int i = 0; i < half; ++i) {
    const float a = y[i], b = y[i + half];
    y[i] = a * c[i] - b * s[i];
    y[i + half] = b * c[i + half] + a * s[i + half];
  }
  store_row(y, row, p.D);
}

template <typename T>
void norm_rope(const NormRopeParams& p) {
  const int64_t heads = p.H + p.Hk;
  at::parallel_for(0, static_cast<int64_t>(p.B) * p.T * heads, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> y(p.D);
    for (int64_t i = begin; i < end; ++i) {
      const int b = static_cast<int>(i / (p.T * heads)), t = static_cast<int>(i / heads % p.T);
      const int h = static_cast<int>(i % heads);
      const float* c = p.cos + b * p.cs_sb + t * p.cs_st;
      const float* s = p.sin + b * p.cs_sb + t * p.cs_st;
      if (h < p.H) {
        norm_rope_row(static_cast<T*>(p.q) + b * p.q_sb + t * p.q_st + h * p.q_sh, y.data(), p, p.q_w, c, s);
      } else {
        const int hk = h - p.H;
        norm_rope_row(static_cast<T*>(p.k) + b * p.k_sb + t * p.k_st + hk * p.k_sh, y.data(), p, p.k_w, c, s);
      }
    }
  });
}

}  // namespace

void qk_norm(const NormParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return norm<float>(p);
    case DType::kFloat16: return norm<c10::Half>(p);
    case DType::kBFloat16: return norm<c10::BFloat16>(p);
  }
}

void qk_norm_rope(const NormRopeParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return norm_rope<float>(p);
    case DType::kFloat16: return norm_rope<c10::Half>(p);
    case DType::kBFloat16: return norm_rope<c10::BFloat16>(p);
  }
}

}  // namespace cpu
}  // namespace attnkit
