// CUDA split-KV attention of packed query rows (attention_decode; Loki reuses it over selected
// positions), the in-place cache append, and the split reduction.
//
// Grid: (split, KV head x row tile, batch row). A block holds up to RT query rows of one KV head
// (the G query heads x Tq steps of a GQA group: "group packing"), so each K/V row is read from
// memory once per group. Keys are scored in tiles of kKeyTile: groups of `tgk` lanes read one key
// row with 16-byte loads and reduce their partial dots with shuffles; one warp per row updates the
// online softmax (log2 domain: q is pre-multiplied by scale * log2(e)); then groups of `tgv` lanes
// accumulate p @ V in registers. Partial (m, l, acc) of each split go to a workspace that
// `combine_kernel` reduces. Nothing here synchronises with the host: split counts come from
// Smax (or top_k), never from cache_seqlens values.
#include <algorithm>

#include "common.cuh"

namespace attnkit {
namespace cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kKeyTile = 64;
constexpr int kMaxHeadDim = 256;
constexpr int kMinSplitKeys = 256;  // fewest keys worth a split of their own

struct Launch {
  int nvk = 0, nvv = 0;  // 16-byte vectors per K / V row
  int tgk = 1, tgv = 1;  // lanes per K / V row (powers of two <= 32)
  int rows_per_tile = 1, row_tiles = 1;
  int nsplit = 1;
  int64_t split_len = 0;
  float* part_o = nullptr;
  float* part_ml = nullptr;
};

inline int pow2_at_least(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

template <typename T, typename QT, int RT, int VPT>
__global__ void __launch_bounds__(kThreads) attend_kernel(const AttendParams p, const Launch c) {
  constexpr int VEC = Vec<T>::kN;
  extern __shared__ float s_red[];  // [kThreads / tgv][RT][Dv]: per-group partial outputs
  __shared__ float s_p[RT][kKeyTile];
  __shared__ float s_m[RT], s_l[RT], s_alpha[RT];
  __shared__ int64_t s_pos[kKeyTile];
  __shared__ int64_t s_koff[kKeyTile], s_voff[kKeyTile];  // element offsets of the tile's K / V rows

  const int split = blockIdx.x;
  const int hk = blockIdx.y / c.row_tiles, tile = blockIdx.y % c.row_tiles;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int R = p.G * p.Tq;
  const int r0 = tile * c.rows_per_tile;
  const int nr = min(c.rows_per_tile, R - r0);

  // The key list of this block and this split's part of it.
  const int64_t L = static_cast<int64_t>(p.lens[b]) + p.len_add;
  const int32_t* list = nullptr;
  int64_t n_keys = L;
  if (p.sel_idx != nullptr) {
    const int64_t li = (static_cast<int64_t>(b) * p.Hk + hk) * p.sel_rows + (p.sel_rows > 1 ? r0 : 0);
    list = p.sel_idx + li * p.sel_cap;
    n_keys = p.sel_count[li];
  }
  // A sliding window (decode lists only) starts the splits at the first key any row sees.
  const bool dense = list == nullptr;
  const bool windowed = dense && p.causal && p.window_left >= 0;
  const int64_t start = windowed ? max(static_cast<int64_t>(0), L - p.Tq - p.window_left) : 0;
  // Split k covers [bound(k), bound(k + 1)). Inner bounds of decode lists fall on multiples of
  // kKeyTile positions, as do the key tiles: a tile never shares a page of a paged cache with
  // another split, and it covers whole pages when block_size divides kKeyTile.
  auto bound = [&](int k) -> int64_t {
    if (k == 0) return min(start, n_keys);
    if (k >= c.nsplit) return n_keys;
    const int64_t x = start + static_cast<int64_t>(k) * c.split_len;
    return min(n_keys, dense ? max(start, x / kKeyTile * kKeyTile) : x);
  };
  const int64_t j0 = bound(split);
  int64_t j1 = bound(split + 1);
  int64_t limit[RT];  // last visible position of each row (bottom-right causal)
  int64_t first[RT];  // first visible position of each row (sliding window)
  int64_t last = -1;
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int t = (r0 + r) % p.Tq;
    limit[r] = p.causal ? L - p.Tq + t : INT64_MAX;
    first[r] = windowed ? L - p.Tq + t - p.window_left : INT64_MIN;
    if (r < nr) last = max(last, limit[r]);
  }
  j1 = min(j1, last == INT64_MAX ? j1 : last + 1);

  // This thread's slice of each q row: vectors lk, lk + tgk, ... of D.
  const int gk = tid / c.tgk, lk = tid % c.tgk, ngk = kThreads / c.tgk;
  const int gv = tid / c.tgv, lv = tid % c.tgv, ngv = kThreads / c.tgv;
  const float qmul = p.scale * kLog2e;
  const float cap2 = p.softcap * kLog2e;  // the softcap in the log2 domain of the scores
  const float inv_cap2 = p.softcap > 0.0f ? 1.0f / cap2 : 0.0f;
  float qreg[RT][VPT][VEC];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int rr = r0 + r, g = rr / p.Tq, t = rr % p.Tq, h = hk * p.G + g;
#pragma unroll
    for (int u = 0; u < VPT; ++u) {
      const int vi = lk + u * c.tgk;
#pragma unroll
      for (int e = 0; e < VEC; ++e) qreg[r][u][e] = 0.0f;
      if (r < nr && vi < c.nvk) {
        const QT* qp = static_cast<const QT*>(p.q) + b * p.q_sb + t * p.q_st + h * p.q_sh + vi * VEC;
#pragma unroll
        for (int e = 0; e < VEC; ++e) qreg[r][u][e] = to_f(qp[e]) * qmul;
      }
    }
  }
  if (tid < RT) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.0f;
  }
  float acc[RT][VPT][VEC];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int u = 0; u < VPT; ++u)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r][u][e] = 0.0f;

  // Rows of position s: kbase + cache_offset(.., s, k_sb, k_ss) (contiguous or paged), computed
  // once per tile and key into s_koff / s_voff, so the loads below do no table lookups. For a
  // decode list the tile's positions are consecutive: one division per tile, and the threads of
  // one page read the same table entry (one transaction).
  const T* kbase = static_cast<const T*>(p.k) + hk * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + hk * p.v_sh;
  const int32_t* table = p.block_table != nullptr ? p.block_table + b * p.bt_stride : nullptr;

  for (int64_t jt = dense ? j0 / kKeyTile * kKeyTile : j0; jt < j1; jt += kKeyTile) {
    __syncthreads();  // the previous tile is done with s_pos / s_koff / s_voff / s_p
    if (tid < kKeyTile) {
      const int64_t j = jt + tid;
      int64_t s = -1, ko = 0, vo = 0;
      if (j >= j0 && j < j1) {
        if (!dense) {
          s = list[j];
          ko = cache_offset(p.block_table, p.bt_stride, p.block_size, b, s, p.k_sb, p.k_ss);
          vo = cache_offset(p.block_table, p.bt_stride, p.block_size, b, s, p.v_sb, p.v_ss);
        } else if (table == nullptr) {
          s = j;
          ko = b * p.k_sb + s * p.k_ss;
          vo = b * p.v_sb + s * p.v_ss;
        } else {
          s = j;
          const int bs = p.block_size;
          const int64_t page0 = jt / bs;  // the same for every thread of the tile
          const int x = static_cast<int>(jt - page0 * bs) + tid;
          const int64_t page = page0 + x / bs, in = x % bs;
          const int64_t blk = table[page];
          ko = blk * p.k_sb + in * p.k_ss;
          vo = blk * p.v_sb + in * p.v_ss;
        }
      }
      s_pos[tid] = s;
      s_koff[tid] = ko;
      s_voff[tid] = vo;
    }
    __syncthreads();
    // Scores: [RT, D] . [kKeyTile, D]^T -> s_p [RT, kKeyTile]; one K row per lane group.
    for (int jj0 = 0; jj0 < kKeyTile; jj0 += ngk) {  // uniform trip count: shuffles below
      const int jj = jj0 + gk;
      const int64_t s = jj < kKeyTile ? s_pos[jj] : -1;
      const T* krow = kbase + (jj < kKeyTile ? s_koff[jj] : 0);
      float kf[VPT][VEC];
#pragma unroll
      for (int u = 0; u < VPT; ++u) {
        const int vi = lk + u * c.tgk;
        if (s >= 0 && vi < c.nvk) {
          load_vec(krow + vi * VEC, kf[u]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) kf[u][e] = 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        float part = 0.0f;
#pragma unroll
        for (int u = 0; u < VPT; ++u)
#pragma unroll
          for (int e = 0; e < VEC; ++e) part += qreg[r][u][e] * kf[u][e];
        part = group_sum(part, c.tgk);
        if (p.softcap > 0.0f) part = cap2 * tanhf(part * inv_cap2);
        if (lk == 0 && jj < kKeyTile)
          s_p[r][jj] = (s >= 0 && r < nr && s <= limit[r] && s >= first[r]) ? part : -INFINITY;
      }
    }
    __syncthreads();
    // Online softmax, one warp per row: m, l and the rescale factor of the accumulators.
    for (int r = warp; r < nr; r += kWarps) {
      const float x0 = s_p[r][lane], x1 = s_p[r][lane + 32];
      const float m_old = s_m[r];
      const float m_new = nan_max(m_old, warp_max(nan_max(x0, x1)));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: all p = 0
      const float p0 = exp2f(x0 - m_use), p1 = exp2f(x1 - m_use);
      s_p[r][lane] = p0;
      s_p[r][lane + 32] = p1;
      const float sum = warp_sum(p0 + p1);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        s_l[r] = s_l[r] * alpha + sum;
        s_m[r] = m_new;
        s_alpha[r] = alpha;
      }
    }
    __syncthreads();
    // acc = alpha * acc + p @ V: [RT, kKeyTile] @ [kKeyTile, Dv], one V row per lane group.
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const float a = r < nr ? s_alpha[r] : 0.0f;
#pragma unroll
      for (int u = 0; u < VPT; ++u)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][u][e] *= a;
    }
    for (int jj = gv; jj < kKeyTile; jj += ngv) {
      if (s_pos[jj] < 0) continue;
      const T* vrow = vbase + s_voff[jj];
#pragma unroll
      for (int u = 0; u < VPT; ++u) {
        const int vi = lv + u * c.tgv;
        if (vi >= c.nvv) continue;
        float vf[VEC];
        load_vec(vrow + vi * VEC, vf);
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const float pr = r < nr ? s_p[r][jj] : 0.0f;
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[r][u][e] += pr * vf[e];
        }
      }
    }
  }

  // Sum the lane groups' partial accumulators, then normalise (one split) or store the partial state.
  const int Dv = p.Dv;
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    if (r >= nr) continue;
#pragma unroll
    for (int u = 0; u < VPT; ++u) {
      const int vi = lv + u * c.tgv;
      if (vi >= c.nvv) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) s_red[(gv * RT + r) * Dv + vi * VEC + e] = acc[r][u][e];
    }
  }
  __syncthreads();
  const int H = p.Hk * p.G;
  for (int idx = tid; idx < nr * Dv; idx += kThreads) {
    const int r = idx / Dv, d = idx % Dv;
    float o = 0.0f;
    for (int g = 0; g < ngv; ++g) o += s_red[(g * RT + r) * Dv + d];
    const int rr = r0 + r, g = rr / p.Tq, t = rr % p.Tq, h = hk * p.G + g;
    const int64_t row = (static_cast<int64_t>(b) * p.Tq + t) * H + h;  // out [B, Tq, H, Dv]
    if (c.nsplit == 1) {
      const float l = s_l[r];
      static_cast<T*>(p.out)[row * Dv + d] = from_f<T>(l == 0.0f ? 0.0f : o / l);  // no key seen: zeros
    } else {
      const int64_t slot = row * c.nsplit + split;
      c.part_o[slot * Dv + d] = o;
      if (d == 0) {
        c.part_ml[slot * 2] = s_m[r];
        c.part_ml[slot * 2 + 1] = s_l[r];
      }
    }
  }
}

// o = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M) for every (b, t, h) row.
template <typename T>
__global__ void combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml, int nsplit,
                               int Dv, T* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const float* ml = part_ml + row * nsplit * 2;
  float M = -INFINITY;
  for (int s = 0; s < nsplit; ++s) M = nan_max(M, ml[2 * s]);
  for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
    float o = 0.0f, l = 0.0f;
    if (M != -INFINITY) {
      for (int s = 0; s < nsplit; ++s) {
        if (ml[2 * s] == -INFINITY) continue;  // an empty split
        const float f = exp2f(ml[2 * s] - M);
        l += ml[2 * s + 1] * f;
        o += part_o[(row * nsplit + s) * Dv + d] * f;
      }
    }
    out[row * Dv + d] = from_f<T>(l == 0.0f ? 0.0f : o / l);
  }
}

template <typename T>
__global__ void append_kernel(const AppendParams a) {
  const int i = blockIdx.x;  // (b, t, hk)
  const int b = i / (a.Tq * a.Hk), t = i / a.Hk % a.Tq, hk = i % a.Hk;
  const int64_t s = static_cast<int64_t>(a.lens[b]) + t;
  const T* kn = static_cast<const T*>(a.k_new) + b * a.kn_sb + t * a.kn_st + hk * a.kn_sh;
  const T* vn = static_cast<const T*>(a.v_new) + b * a.vn_sb + t * a.vn_st + hk * a.vn_sh;
  T* k = static_cast<T*>(a.k) + cache_offset(a.block_table, a.bt_stride, a.block_size, b, s, a.k_sb, a.k_ss) +
         hk * a.k_sh;
  T* v = static_cast<T*>(a.v) + cache_offset(a.block_table, a.bt_stride, a.block_size, b, s, a.v_sb, a.v_ss) +
         hk * a.v_sh;
  for (int d = threadIdx.x; d < a.D; d += blockDim.x) k[d] = kn[d];
  for (int d = threadIdx.x; d < a.Dv; d += blockDim.x) v[d] = vn[d];
}

template <typename T, typename QT, int RT, int VPT>
void launch_rows(const AttendParams& p, const Launch& c, cudaStream_t stream) {
  const int ngv = kThreads / c.tgv;
  const size_t smem = sizeof(float) * static_cast<size_t>(ngv) * RT * p.Dv;
  const dim3 grid(c.nsplit, p.Hk * c.row_tiles, p.B);
  attend_kernel<T, QT, RT, VPT><<<grid, kThreads, smem, stream>>>(p, c);
}

template <typename T, typename QT>
void launch_typed(const AttendParams& p, const Launch& c, int vpt, cudaStream_t stream) {
  if constexpr (sizeof(T) == 4) {
    if (vpt == 2) {
      if (c.rows_per_tile == 1) return launch_rows<T, QT, 1, 2>(p, c, stream);
      return launch_rows<T, QT, 8, 2>(p, c, stream);
    }
  }
  if (c.rows_per_tile == 1) return launch_rows<T, QT, 1, 1>(p, c, stream);
  launch_rows<T, QT, 8, 1>(p, c, stream);
}

}  // namespace

bool attend_supported(const AttendParams& p) {
  const int vec = p.dtype == DType::kFloat32 ? 4 : 8;
  const int64_t bytes = vec * (p.dtype == DType::kFloat32 ? 4 : 2);
  auto aligned = [&](const void* ptr, std::initializer_list<int64_t> strides) {
    if (reinterpret_cast<std::uintptr_t>(ptr) % bytes != 0) return false;
    for (int64_t s : strides)
      if (s % vec != 0) return false;
    return true;
  };
  return p.D % vec == 0 && p.Dv % vec == 0 && p.D <= kMaxHeadDim && p.Dv <= kMaxHeadDim &&
         aligned(p.k, {p.k_sb, p.k_ss, p.k_sh}) && aligned(p.v, {p.v_sb, p.v_ss, p.v_sh});
}

Workspace plan_splits(int B, int Hk, int G, int Tq, int64_t max_keys, bool per_head_lists, int num_sms) {
  Workspace ws;
  const int R = G * Tq;
  const int rows_per_tile = per_head_lists ? 1 : (R < 8 ? R : 8);
  const int64_t blocks = static_cast<int64_t>(B) * Hk * ceil_div(R, rows_per_tile);
  // Enough blocks for about four per SM, but no split shorter than kMinSplitKeys.
  const int64_t want = blocks >= 4LL * num_sms ? 1 : ceil_div(4LL * num_sms, blocks);
  const int64_t most = std::max<int64_t>(1, max_keys / kMinSplitKeys);
  ws.nsplit = static_cast<int>(std::min<int64_t>(std::min(want, most), 256));
  ws.split_len = ceil_div(ceil_div(std::max<int64_t>(max_keys, 1), ws.nsplit), kKeyTile) * kKeyTile;
  return ws;
}

std::string launch_attend(const AttendParams& p, const Workspace& ws, cudaStream_t stream) {
  Launch c;
  const int vec = p.dtype == DType::kFloat32 ? 4 : 8;
  c.nvk = p.D / vec;
  c.nvv = p.Dv / vec;
  const int vpt = (c.nvk > 32 || c.nvv > 32) ? 2 : 1;  // only float32 with D > 128
  c.tgk = pow2_at_least(static_cast<int>(ceil_div(c.nvk, vpt)));
  c.tgv = pow2_at_least(static_cast<int>(ceil_div(c.nvv, vpt)));
  const int R = p.G * p.Tq;
  const bool per_head_lists = p.sel_idx != nullptr && p.sel_rows > 1;
  c.rows_per_tile = per_head_lists ? 1 : (R < 8 ? R : 8);
  c.row_tiles = static_cast<int>(ceil_div(R, c.rows_per_tile));
  c.nsplit = ws.nsplit;
  c.split_len = ws.split_len;
  c.part_o = ws.part_o;
  c.part_ml = ws.part_ml;
  if (p.B == 0 || R == 0 || p.Dv == 0) return std::string();
  ATTNKIT_DISPATCH_DTYPE(p.dtype, {
    if (p.q_f32) {
      launch_typed<scalar_t, float>(p, c, vpt, stream);
    } else {
      launch_typed<scalar_t, scalar_t>(p, c, vpt, stream);
    }
  });
  std::string err = launch_error("attend_kernel");
  if (!err.empty() || c.nsplit == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Tq * p.Hk * p.G;
  ATTNKIT_DISPATCH_DTYPE(p.dtype, {
    combine_kernel<scalar_t><<<static_cast<unsigned>(rows), 128, 0, stream>>>(
        ws.part_o, ws.part_ml, c.nsplit, p.Dv, static_cast<scalar_t*>(p.out));
  });
  return launch_error("combine_kernel");
}

std::string attention_decode(const AttendParams& p, const AppendParams* append, const Workspace& ws,
                             std::intptr_t stream) {
  const cudaStream_t st = as_stream(stream);
  if (append != nullptr && append->B * append->Tq * append->Hk > 0) {
    ATTNKIT_DISPATCH_DTYPE(append->dtype, {
      append_kernel<scalar_t><<<append->B * append->Tq * append->Hk, 128, 0, st>>>(*append);
    });
    std::string err = launch_error("append_kernel");
    if (!err.empty()) return err;
  }
  return launch_attend(p, ws, st);
}

}  // namespace cuda
}  // namespace attnkit
