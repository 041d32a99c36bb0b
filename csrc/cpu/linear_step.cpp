// CPU linear_attention_step: one token of linear / lightning attention, state updated in place.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_common.h"

namespace attnkit {
namespace cpu {

namespace {

inline float feature(float x, FeatureMap fm) {
  switch (fm) {
    case FeatureMap::kElu: return x > 0.0f ? x + 1.0f : std::expm1(x) + 1.0f;  // elu(x) + 1
    case FeatureMap::kRelu: return x > 0.0f ? x : 0.0f;
    case FeatureMap::kNone: break;
  }
  return x;
}

template <typename T>
void step(const LinearStepParams& p) {
  const int Hs = p.lightning ? p.H : p.Hk;        // state heads
  const int rows = p.lightning ? 1 : p.G;         // query heads per state head
  const int Dk = p.Dk, Dv = p.Dv;
  at::parallel_for(0, static_cast<int64_t>(p.B) * Hs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(Dk), vf(Dv), qf(rows * Dk), o(rows * Dv);
    for (int64_t it = begin; it < end; ++it) {
      const int b = static_cast<int>(it / Hs), sh = static_cast<int>(it % Hs);
      const int kv = p.lightning ? sh / p.G : sh;
      const int64_t n = p.state_indices != nullptr ? p.state_indices[b] : b;
      load_row(static_cast<const T*>(p.k) + b * p.k_sb + kv * p.k_sh, kf.data(), Dk);
      load_row(static_cast<const T*>(p.v) + b * p.v_sb + kv * p.v_sh, vf.data(), Dv);
      for (int i = 0; i < Dk; ++i) kf[i] = feature(kf[i], p.feature_map);
      for (int r = 0; r < rows; ++r) {
        const int h = p.lightning ? sh : sh * p.G + r;
        float* qr = &qf[r * Dk];
        load_row(static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh, qr, Dk);
        for (int i = 0; i < Dk; ++i) qr[i] = feature(qr[i] * p.scale, p.feature_map);
      }
      const float lam = p.decay != nullptr ? std::exp(-p.decay[sh]) : 1.0f;
      float* S = p.S + n * p.S_sn + sh * p.S_sh;
      std::fill(o.begin(), o.end(), 0.0f);
      for (int i = 0; i < Dk; ++i) {
        float* Si = S + static_cast<int64_t>(i) * Dv;
        const float ki = kf[i];
        // S_t = λ S_{t-1} + φ(k)ᵀ v, row i
#pragma omp simd
        for (int j = 0; j < Dv; ++j) Si[j] = lam * Si[j] + ki * vf[j];
        // o_r += φ(q_r)[i] * S_t[i, :]
        for (int r = 0; r < rows; ++r) axpy(&o[r * Dv], qf[r * Dk + i], Si, Dv);
      }
      if (p.normalize) {
        float* z = p.z + n * p.z_sn + kv * p.z_sh;
        for (int i = 0; i < Dk; ++i) z[i] += kf[i];
        for (int r = 0; r < rows; ++r) scale_row(&o[r * Dv], 1.0f / (dot(&qf[r * Dk], z, Dk) + p.eps), Dv);
      }
      for (int r = 0; r < rows; ++r) {
        const int h = p.lightning ? sh : sh * p.G + r;
        store_row(&o[r * Dv], static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.H + h) * Dv, Dv);
      }
    }
  });
}

}  // namespace

void linear_attention_step(const LinearStepParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return step<float>(p);
    case DType::kFloat16: return step<c10::Half>(p);
    case DType::kBFloat16: return step<c10::BFloat16>(p);
  }
}

}  // namespace cpu
}  // namespace attnkit
