// CUDA loki_attention_decode: rotate q, low-rank scores, per-list radix top-k, then the split-KV
// attention of attend.cu over the selected positions. All on one stream, no host sync.
// Contiguous [B, Smax, Hk, D] or paged [num_blocks, block_size, Hk, D] caches (block_table).
#include <algorithm>

#include "common.cuh"

namespace attnkit {
namespace cuda {

namespace {

constexpr int kScoreThreads = 128;
constexpr int kTopkThreads = 256;

// q_rot[b, h] = q[b, 0, h] @ components[h // G]: [D] @ [D, D] -> [D] (coalesced over columns).
template <typename T>
__global__ void rotate_kernel(const LokiParams p) {
  extern __shared__ float s_q[];  // [D]
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) s_q[d] = to_f(q[d]);
  __syncthreads();
  const float* C = p.components + static_cast<int64_t>(h / p.G) * p.D * p.D;
  for (int e = threadIdx.x; e < p.D; e += blockDim.x) {
    float acc = 0.0f;
    for (int d = 0; d < p.D; ++d) acc += s_q[d] * C[static_cast<int64_t>(d) * p.D + e];
    p.q_rot[static_cast<int64_t>(blockIdx.x) * p.D + e] = acc;
  }
}

// scores[b, hk, g, s] = q_rot[b, hk G + g, :rank] . k_rot[b, s, hk, :rank] for s < lens[b]
// (selection="group": one list per KV head, the max over g). One position per thread. Paged
// caches: the block reads the table entries of the pages its positions cover once (one read per
// page, into shared memory), then each thread addresses its row from its page's entry; entries
// of pages past the row's length are not read.
template <typename T>
__global__ void score_kernel(const LokiParams p) {
  __shared__ int32_t s_blocks[kScoreThreads + 1];  // pages a run of kScoreThreads positions can touch
  const int hk = blockIdx.y, b = blockIdx.z;
  const int64_t s_first = static_cast<int64_t>(blockIdx.x) * kScoreThreads;
  const int64_t s = s_first + threadIdx.x;
  const int64_t L = p.lens[b];
  int64_t off = 0;
  if (p.block_table != nullptr) {
    if (s_first >= L) return;  // the whole block is past the row's length
    const int64_t bs = p.block_size, page0 = s_first / bs;
    const int64_t last = L < s_first + kScoreThreads ? L - 1 : s_first + kScoreThreads - 1;
    const int64_t pages = last / bs - page0 + 1;
    for (int64_t i = threadIdx.x; i < pages; i += blockDim.x)
      s_blocks[i] = p.block_table[b * p.bt_stride + page0 + i];
    __syncthreads();
    if (s >= L) return;
    const int64_t page = s / bs;
    off = static_cast<int64_t>(s_blocks[page - page0]) * p.k_sb + (s - page * bs) * p.k_ss;
  } else {
    if (s >= L) return;
    off = b * p.k_sb + s * p.k_ss;
  }
  const T* k = static_cast<const T*>(p.k) + off + hk * p.k_sh;
  const float* qr = p.q_rot + (static_cast<int64_t>(b) * p.H + static_cast<int64_t>(hk) * p.G) * p.D;
  const int Gs = p.group ? 1 : p.G;
  float* out = p.scores + (static_cast<int64_t>(b) * p.Hk + hk) * Gs * p.Smax + s;
  float best = -INFINITY;
  for (int g = 0; g < p.G; ++g) {
    float acc = 0.0f;
    for (int i = 0; i < p.rank; ++i) acc += __ldg(qr + g * p.D + i) * to_f(k[i]);  // q_rot: warp broadcast
    if (p.group) {
      best = nan_max(best, acc);
    } else {
      out[g * p.Smax] = acc;
    }
  }
  if (p.group) out[0] = best;
}

// Order-preserving map of a float to uint32 (NaN ranks highest, as in torch.topk).
__device__ __forceinline__ uint32_t order_key(float f) {
  if (f != f) return 0xFFFFFFFFu;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One block per list: the top_k positions by radix select (four 8-bit digits, most significant
// first) on the order keys, then one pass that collects every key above the threshold and as
// many keys equal to it as are still needed. Rows not longer than top_k take every position.
__global__ void __launch_bounds__(kTopkThreads) topk_kernel(const LokiParams p) {
  __shared__ unsigned int s_hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_need;
  __shared__ unsigned int s_above, s_equal;
  const int64_t li = blockIdx.x;
  const int Gs = p.group ? 1 : p.G;
  const int b = static_cast<int>(li / (static_cast<int64_t>(p.Hk) * Gs));
  const int64_t L = p.lens[b];
  int32_t* idx = p.sel_idx + li * p.top_k;
  if (L <= p.top_k) {
    for (int64_t s = threadIdx.x; s < L; s += kTopkThreads) idx[s] = static_cast<int32_t>(s);
    if (threadIdx.x == 0) p.sel_count[li] = static_cast<int32_t>(L);
    return;
  }
  const float* sc = p.scores + li * p.Smax;
  if (threadIdx.x == 0) {
    s_prefix = 0;
    s_need = p.top_k;  // how many of the keys matching the prefix are still to be taken
    s_above = 0;
    s_equal = 0;
  }
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kTopkThreads) s_hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    for (int64_t s = threadIdx.x; s < L; s += kTopkThreads) {
      const uint32_t key = order_key(sc[s]);
      if ((key & mask) == prefix) atomicAdd(&s_hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      for (int d = 255; d >= 0; --d) {
        if (above + s_hist[d] >= s_need) {
          s_prefix = prefix | (static_cast<uint32_t>(d) << shift);
          s_need -= above;
          break;
        }
        above += s_hist[d];
      }
    }
    mask |= 255u << shift;
    __syncthreads();
  }
  const uint32_t thresh = s_prefix;
  const int64_t take_equal = s_need, n_above = p.top_k - s_need;
  for (int64_t s = threadIdx.x; s < L; s += kTopkThreads) {
    const uint32_t key = order_key(sc[s]);
    if (key > thresh) {
      idx[atomicAdd(&s_above, 1u)] = static_cast<int32_t>(s);
    } else if (key == thresh) {
      const unsigned int e = atomicAdd(&s_equal, 1u);
      if (e < take_equal) idx[n_above + e] = static_cast<int32_t>(s);
    }
  }
  if (threadIdx.x == 0) p.sel_count[li] = static_cast<int32_t>(p.top_k);
}

}  // namespace

std::string loki_attention_decode(const LokiParams& p, const Workspace& ws, std::intptr_t stream) {
  const cudaStream_t st = as_stream(stream);
  if (p.B == 0 || p.H == 0 || p.Smax == 0) return std::string();
  const int Gs = p.group ? 1 : p.G;
  ATTNKIT_DISPATCH_DTYPE(p.dtype, {
    rotate_kernel<scalar_t><<<p.B * p.H, 128, sizeof(float) * p.D, st>>>(p);
    const dim3 grid(static_cast<unsigned>(ceil_div(p.Smax, kScoreThreads)), p.Hk, p.B);
    score_kernel<scalar_t><<<grid, kScoreThreads, 0, st>>>(p);
  });
  std::string err = launch_error("loki rotate/score");
  if (!err.empty()) return err;
  topk_kernel<<<static_cast<unsigned>(static_cast<int64_t>(p.B) * p.Hk * Gs), kTopkThreads, 0, st>>>(p);
  err = launch_error("loki topk_kernel");
  if (!err.empty()) return err;
  AttendParams a;
  a.dtype = p.dtype;
  a.B = p.B;
  a.Hk = p.Hk;
  a.G = p.G;
  a.Tq = 1;
  a.D = p.D;
  a.Dv = p.Dv;
  a.scale = p.scale;
  a.q = p.q_rot;  // exact scores: rotated q against the full rotated keys
  a.q_f32 = true;
  a.q_sb = static_cast<int64_t>(p.H) * p.D;
  a.q_sh = p.D;
  a.k = p.k;
  a.k_sb = p.k_sb;
  a.k_ss = p.k_ss;
  a.k_sh = p.k_sh;
  a.v = p.v;
  a.v_sb = p.v_sb;
  a.v_ss = p.v_ss;
  a.v_sh = p.v_sh;
  a.lens = p.lens;
  a.block_table = p.block_table;  // selected positions are read through the table
  a.bt_stride = p.bt_stride;
  a.block_size = p.block_size;
  a.causal = false;
  a.sel_idx = p.sel_idx;
  a.sel_count = p.sel_count;
  a.sel_rows = Gs;
  a.sel_cap = p.top_k;
  a.out = p.out;
  return launch_attend(a, ws, st);
}

}  // namespace cuda
}  // namespace attnkit
