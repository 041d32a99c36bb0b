// CUDA linear_attention_step: one token of linear / lightning attention, state updated in place.
//
// One block per (state head, batch row). Threads own state columns j and a slice of the Dk rows:
// each state element is read and written exactly once (coalesced along Dv); the output rows
// o_r = φ(q_r) S_t of the query heads that share the state are accumulated per slice and summed
// through shared memory, kRowChunk query heads at a time.
#include "common.cuh"

namespace attnkit {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kRowChunk = 8;
constexpr int kMaxDim = 512;

__device__ __forceinline__ float feature(float x, FeatureMap fm) {
  if (fm == FeatureMap::kElu) return x > 0.0f ? x + 1.0f : expm1f(x) + 1.0f;  // elu(x) + 1
  if (fm == FeatureMap::kRelu) return fmaxf(x, 0.0f);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) step_kernel(const LinearStepParams p) {
  extern __shared__ float smem[];
  const int Dk = p.Dk, Dv = p.Dv;
  float* s_k = smem;                    // [Dk] φ(k)
  float* s_z = s_k + Dk;                // [Dk] z_t (normalize)
  float* s_v = s_z + Dk;                // [Dv]
  float* s_q = s_v + Dv;                // [kRowChunk, Dk] φ(scale q)
  float* s_red = s_q + kRowChunk * Dk;  // [slices, kRowChunk, Dv]
  __shared__ float s_den[kRowChunk];

  const int sh = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int rows = p.lightning ? 1 : p.G;
  const int kv = p.lightning ? sh / p.G : sh;
  const int64_t n = p.state_indices != nullptr ? p.state_indices[b] : b;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + kv * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + kv * p.v_sh;
  float* S = p.S + n * p.S_sn + sh * p.S_sh;
  for (int i = tid; i < Dk; i += kThreads) s_k[i] = feature(to_f(k[i]), p.feature_map);
  for (int j = tid; j < Dv; j += kThreads) s_v[j] = to_f(v[j]);
  __syncthreads();
  if (p.normalize) {
    float* z = p.z + n * p.z_sn + kv * p.z_sh;
    for (int i = tid; i < Dk; i += kThreads) {
      const float zi = z[i] + s_k[i];  // z_t = z_{t-1} + φ(k_t)
      z[i] = zi;
      s_z[i] = zi;
    }
  }
  const float lam = p.decay != nullptr ? expf(-p.decay[sh]) : 1.0f;

  const int cols = Dv < kThreads ? Dv : kThreads;
  const int slices = kThreads / cols;
  const int col0 = tid % cols, slice = tid / cols;
  const int i0 = static_cast<int>(ceil_div(static_cast<int64_t>(Dk) * slice, slices));
  const int i1 = static_cast<int>(ceil_div(static_cast<int64_t>(Dk) * (slice + 1), slices));
  for (int g0 = 0; g0 < rows; g0 += kRowChunk) {
    const int nrc = min(kRowChunk, rows - g0);
    __syncthreads();  // s_q / s_red of the previous chunk are consumed
    for (int idx = tid; idx < nrc * Dk; idx += kThreads) {
      const int r = idx / Dk, i = idx % Dk;
      const int h = p.lightning ? sh : sh * p.G + g0 + r;
      s_q[idx] = feature(to_f(static_cast<const T*>(p.q)[b * p.q_sb + h * p.q_sh + i]) * p.scale, p.feature_map);
    }
    __syncthreads();
    if (p.normalize) {  // den_r = φ(q_r) . z_t + eps, one warp per row
      for (int r = tid / 32; r < nrc; r += kThreads / 32) {
        float d = 0.0f;
        for (int i = tid % 32; i < Dk; i += 32) d += s_q[r * Dk + i] * s_z[i];
        d = warp_sum(d);
        if (tid % 32 == 0) s_den[r] = d + p.eps;
      }
    }
    if (slice < slices) {
      for (int j = col0; j < Dv; j += cols) {
        float o[kRowChunk];
#pragma unroll
        for (int r = 0; r < kRowChunk; ++r) o[r] = 0.0f;
        for (int i = i0; i < i1; ++i) {
          float s = S[static_cast<int64_t>(i) * Dv + j];
          if (g0 == 0) {  // S_t = λ S_{t-1} + φ(k)ᵀ v, once; later chunks read S_t back
            s = lam * s + s_k[i] * s_v[j];
            S[static_cast<int64_t>(i) * Dv + j] = s;
          }
#pragma unroll
          for (int r = 0; r < kRowChunk; ++r)
            if (r < nrc) o[r] += s_q[r * Dk + i] * s;
        }
#pragma unroll
        for (int r = 0; r < kRowChunk; ++r)
          if (r < nrc) s_red[(slice * kRowChunk + r) * Dv + j] = o[r];
      }
    }
    __syncthreads();
    for (int idx = tid; idx < nrc * Dv; idx += kThreads) {
      const int r = idx / Dv, j = idx % Dv;
      const int h = p.lightning ? sh : sh * p.G + g0 + r;
      float o = 0.0f;
      for (int sl = 0; sl < slices; ++sl) o += s_red[(sl * kRowChunk + r) * Dv + j];
      if (p.normalize) o /= s_den[r];
      static_cast<T*>(p.out)[(static_cast<int64_t>(b) * p.H + h) * Dv + j] = from_f<T>(o);
    }
  }
}

}  // namespace

std::string linear_attention_step(const LinearStepParams& p, std::intptr_t stream) {
  if (p.B == 0 || p.H == 0) return std::string();
  if (p.Dk > kMaxDim || p.Dv > kMaxDim) return "head dims above 512 are not supported";
  const int Hs = p.lightning ? p.H : p.Hk;
  const int cols = p.Dv < kThreads ? p.Dv : kThreads;
  const int slices = cols == 0 ? 1 : kThreads / cols;
  const size_t smem = sizeof(float) * (2 * p.Dk + p.Dv + kRowChunk * p.Dk + static_cast<size_t>(slices) * kRowChunk * p.Dv);
  const dim3 grid(Hs, p.B);
  ATTNKIT_DISPATCH_DTYPE(p.dtype, { step_kernel<scalar_t><<<grid, kThreads, smem, as_stream(stream)>>>(p); });
  return launch_error("linear_attention_step");
}

}  // namespace cuda
}  // namespace attnkit
