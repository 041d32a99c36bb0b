// Shared pieces of the CPU kernels: dtype conversion, vectorisable dot/axpy/exp loops.
//
// Inner loops run over contiguous head dims in float32 and are written so that GCC/Clang
// vectorise them at -O3 (`#pragma omp simd` reductions need -fopenmp or -fopenmp-simd; the build
// passes -fopenmp, which at::parallel_for needs anyway).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../attnkit_native.h"

namespace attnkit {
namespace cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

// dst[i] = float(src[i]) for i < n.
inline void load_row(const float* src, float* dst, int n) { std::memcpy(dst, src, sizeof(float) * n); }

inline void load_row(const c10::BFloat16* src, float* dst, int n) {
  // bfloat16 is the top half of a float32: a shift, which vectorises.
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[i] = f;
  }
}

inline void load_row(const c10::Half* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void store_row(const float* src, T* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

inline void store_row(const float* src, float* dst, int n) { std::memcpy(dst, src, sizeof(float) * n); }

inline float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Dots of one vector `a` with four vectors: each element of `a` is loaded once.
inline void dot4(const float* a, const float* b0, const float* b1, const float* b2, const float* b3, int n,
                 float* out) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int i = 0; i < n; ++i) {
    s0 += a[i] * b0[i];
    s1 += a[i] * b1[i];
    s2 += a[i] * b2[i];
    s3 += a[i] * b3[i];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// acc[i] += w * x[i]
inline void axpy(float* acc, float w, const float* x, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) acc[i] += w * x[i];
}

// acc[i] += w0 x0[i] + w1 x1[i] + w2 x2[i] + w3 x3[i]: one pass over acc for four rows.
inline void axpy4(float* acc, const float* w, const float* x0, const float* x1, const float* x2, const float* x3,
                  int n) {
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
#pragma omp simd
  for (int i = 0; i < n; ++i) acc[i] += w0 * x0[i] + w1 * x1[i] + w2 * x2[i] + w3 * x3[i];
}

inline void scale_row(float* x, float a, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) x[i] *= a;
}

// exp(x) for the softmax (x <= 0 in use, any x accepted): the Cephes expf polynomial after a
// range reduction by ln 2, about 1 ulp over the range, branch-free so that loops over it
// vectorise. Below -87.3 (where expf is subnormal) it returns 0; NaN propagates.
inline float exp_approx(float x) {
  const float lo = -87.33654f, hi = 88.37626f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r * r + r + 1.0f;
  // 2^n with n in [-126, 127]: build the exponent bits directly.
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &e, sizeof(pow2));
  const float out = y * pow2;
  return x < lo ? 0.0f : out;
}

// x[i] = exp(x[i] - m); returns the sum.
inline float exp_sub_sum(float* x, float m, int n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) {
    const float e = exp_approx(x[i] - m);
    x[i] = e;
    s += e;
  }
  return s;
}

// max that propagates NaN (a NaN score must reach the output, as in the reference).
inline float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

inline float max_of(const float* x, int n) {
  float m = kNegInf;
  for (int i = 0; i < n; ++i) m = nan_max(m, x[i]);
  return m;
}

// Software prefetch of one row (each 64-byte line); Locality 3: into L1, 1: outer levels only.
template <int Locality, typename T>
inline void prefetch_row(const T* row, int n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int bytes = n * static_cast<int>(sizeof(T));
  for (int off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, Locality);
}

// ----------------------------------------------------------------- register-blocked microkernels
// GCC/Clang vector extensions: 8 floats, lowered to AVX2 when the build enables it (see
// attnkit/native/_build.py) and to pairs of SSE/NEON registers otherwise. Loads and stores go
// through memcpy, so no alignment is assumed.

typedef float v8f __attribute__((vector_size(32)));

inline v8f ld8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum8(v8f v) {
  float t[8];
  std::memcpy(t, &v, sizeof(t));
  return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

// s[r * ld_s + j] = q_r . k_j for RB rows of q (row stride D) and n keys:
// [RB, D] @ [D, 2] per step, RB x 2 accumulators in registers (each K row loaded once per RB rows).
template <int RB>
inline void scores_rows(const float* q, int D, const float* const* krow, int n, float* s, int ld_s) {
  int j = 0;
  for (; j + 2 <= n; j += 2) {
    const float* k0 = krow[j];
    const float* k1 = krow[j + 1];
    v8f a0[RB], a1[RB];
    for (int r = 0; r < RB; ++r) a0[r] = a1[r] = v8f{};
    int d = 0;
    for (; d + 8 <= D; d += 8) {
      const v8f x0 = ld8(k0 + d), x1 = ld8(k1 + d);
      for (int r = 0; r < RB; ++r) {
        const v8f qv = ld8(q + r * D + d);
        a0[r] += qv * x0;
        a1[r] += qv * x1;
      }
    }
    for (int r = 0; r < RB; ++r) {
      float t0 = hsum8(a0[r]), t1 = hsum8(a1[r]);
      for (int dd = d; dd < D; ++dd) {
        t0 += q[r * D + dd] * k0[dd];
        t1 += q[r * D + dd] * k1[dd];
      }
      s[r * ld_s + j] = t0;
      s[r * ld_s + j + 1] = t1;
    }
  }
  for (; j < n; ++j)
    for (int r = 0; r < RB; ++r) s[r * ld_s + j] = dot(q + r * D, krow[j], D);
}

// acc[r, :] += sum_j p[r * ld_p + j] v_j for RB rows (row stride Dv): [RB, n] @ [n, 16] per
// column block, the RB x 16 accumulators in registers (each V row loaded once per RB rows).
template <int RB>
inline void pv_rows(float* acc, int Dv, const float* p, int ld_p, const float* const* vrow, int n) {
  int d = 0;
  for (; d + 16 <= Dv; d += 16) {
    v8f a0[RB], a1[RB];
    for (int r = 0; r < RB; ++r) {
      a0[r] = ld8(acc + r * Dv + d);
      a1[r] = ld8(acc + r * Dv + d + 8);
    }
    for (int j = 0; j < n; ++j) {
      const v8f x0 = ld8(vrow[j] + d), x1 = ld8(vrow[j] + d + 8);
      for (int r = 0; r < RB; ++r) {
        const float w = p[r * ld_p + j];
        a0[r] += w * x0;
        a1[r] += w * x1;
      }
    }
    for (int r = 0; r < RB; ++r) {
      st8(acc + r * Dv + d, a0[r]);
      st8(acc + r * Dv + d + 8, a1[r]);
    }
  }
  for (; d < Dv; ++d) {
    for (int r = 0; r < RB; ++r) {
      float a = acc[r * Dv + d];
      for (int j = 0; j < n; ++j) a += p[r * ld_p + j] * vrow[j][d];
      acc[r * Dv + d] = a;
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cpu
}  // namespace attnkit
