// CPU split-KV attention of packed query rows over a key list (decode and Loki share it).
//
// Group packing: the G * Tq query rows of a KV head that share a key list are scored together,
// so each K/V row is read once per group (see AttendShape for the work units). When there are
// fewer units than threads, the key list of each unit is split and the partial softmax states
// (m, l, acc) are merged afterwards (flash-decoding). Float32 accumulation.
#pragma once

#include <ATen/Parallel.h>

#include <numeric>
#include <vector>

#include "cpu_common.h"

namespace attnkit {
namespace cpu {

constexpr int kKeyBlock = 16;         // keys scored together (their K/V rows stay in L1/L2)
constexpr int64_t kMinSplit = 512;    // fewest keys worth a split of their own

// How the rows of a call are cut into work units.
//   dense keys (decode):      unit = (b, key split), all Hk heads: the cache rows of one position
//                             are contiguous ([B, S, Hk, D]), so a unit streams memory in order;
//   one list per KV head:     unit = (b, hk), the G * Tq rows of the head (Loki selection="group");
//   one list per query head:  unit = (b, hk, row), one row (Loki selection="head").
struct AttendShape {
  int R = 0;               // rows per KV head: G * Tq
  int heads = 0;           // KV heads per unit
  int rows_per_head = 0;   // rows of each head in a unit
  int row_blocks = 0;      // units per KV head and batch row
  int64_t units = 0;       // before splitting the keys
};

inline AttendShape attend_shape(const AttendParams& p) {
  AttendShape s;
  s.R = p.G * p.Tq;
  const bool lists = p.sel_idx != nullptr, per_row = lists && p.sel_rows > 1;
  s.heads = lists ? 1 : p.Hk;
  s.rows_per_head = per_row ? 1 : s.R;
  s.row_blocks = per_row ? s.R : 1;
  s.units = static_cast<int64_t>(p.B) * (p.Hk / s.heads) * s.row_blocks;
  return s;
}

struct Unit {
  int b = 0, hk0 = 0, r0 = 0;
};

inline Unit unit_of(const AttendParams& p, const AttendShape& s, int64_t u) {
  const int per_b = (p.Hk / s.heads) * s.row_blocks;
  Unit out;
  out.b = static_cast<int>(u / per_b);
  out.hk0 = static_cast<int>(u % per_b / s.row_blocks) * s.heads;
  out.r0 = static_cast<int>(u % s.row_blocks) * s.rows_per_head;
  return out;
}

// Keys of one unit: the number of list entries (a prefix of 0..L-1, or a selected list).
inline int64_t unit_keys(const AttendParams& p, const Unit& w, const int32_t** list) {
  if (p.sel_idx != nullptr) {
    const int64_t li = (static_cast<int64_t>(w.b) * p.Hk + w.hk0) * p.sel_rows + (p.sel_rows > 1 ? w.r0 : 0);
    *list = p.sel_idx + li * p.sel_cap;
    return p.sel_count[li];
  }
  *list = nullptr;
  return static_cast<int64_t>(p.lens[w.b]) + p.len_add;
}

// First list entry any row of the unit can see: the sliding window skips the keys before it.
inline int64_t unit_first(const AttendParams& p, const Unit& w, const int32_t* list) {
  if (list != nullptr || p.window_left < 0) return 0;
  const int64_t L = static_cast<int64_t>(p.lens[w.b]) + p.len_add;
  return std::max<int64_t>(0, L - p.Tq - p.window_left);
}

template <typename T>
struct AttendWorker {
  static constexpr bool kF32 = std::is_same<T, float>::value;
  const AttendParams& p;
  const AttendShape& shp;
  int rows;  // heads * rows_per_head; row i is row r0 + i % rows_per_head of head hk0 + i / rows_per_head
  std::vector<float> qf, sc, kbuf, vbuf, acc, m, l;
  std::vector<int64_t> limit, first;

  AttendWorker(const AttendParams& params, const AttendShape& shape)
      : p(params), shp(shape), rows(shape.heads * shape.rows_per_head), qf(rows * params.D),
        sc(rows * kKeyBlock), kbuf(kF32 ? 0 : kKeyBlock * params.D), vbuf(kF32 ? 0 : kKeyBlock * params.Dv),
        acc(rows * params.Dv), m(rows), l(rows), limit(rows), first(rows) {}

  // Element offsets (head 0) of the K / V rows of list entries [jb, je) and their positions.
  // Decode lists (positions jb..je-1) walk the cache page by page: one block-table read and one
  // division per page run, then consecutive rows (a contiguous cache is a single page). Selected
  // lists (Loki) address each position on its own.
  void block_rows(int b, const int32_t* list, int64_t jb, int64_t je, int64_t* pos_out, int64_t* koff,
                  int64_t* voff) const {
    const int n = static_cast<int>(je - jb);
    if (list != nullptr) {
      for (int jj = 0; jj < n; ++jj) {
        const int64_t s = list[jb + jj];
        pos_out[jj] = s;
        koff[jj] = cache_offset(p.block_table, p.bt_stride, p.block_size, b, s, p.k_sb, p.k_ss);
        voff[jj] = cache_offset(p.block_table, p.bt_stride, p.block_size, b, s, p.v_sb, p.v_ss);
      }
      return;
    }
    for (int jj = 0; jj < n; ++jj) pos_out[jj] = jb + jj;
    if (p.block_table == nullptr) {
      const int64_t k0 = b * p.k_sb + jb * p.k_ss, v0 = b * p.v_sb + jb * p.v_ss;
      for (int jj = 0; jj < n; ++jj) {
        koff[jj] = k0 + jj * p.k_ss;
        voff[jj] = v0 + jj * p.v_ss;
      }
      return;
    }
    const int32_t* table = p.block_table + b * p.bt_stride;
    const int64_t bs = p.block_size;
    int64_t page = jb / bs, in = jb - page * bs;
    for (int jj = 0; jj < n; ++page, in = 0) {
      const int m = static_cast<int>(std::min<int64_t>(n - jj, bs - in));
      const int64_t blk = table[page];
      const int64_t k0 = blk * p.k_sb + in * p.k_ss, v0 = blk * p.v_sb + in * p.v_ss;
      for (int i = 0; i < m; ++i) {
        koff[jj + i] = k0 + i * p.k_ss;
        voff[jj + i] = v0 + i * p.v_ss;
      }
      jj += m;
    }
  }

  // End of the key block starting at entry jb: decode blocks end at multiples of kKeyBlock
  // positions (a block of a cache with block_size dividing kKeyBlock, or a multiple of it, never
  // straddles a page it does not cover whole, and contiguous and paged caches see the same
  // blocks); selected lists go in runs of kKeyBlock entries.
  static int64_t block_end(const int32_t* list, int64_t jb, int64_t j1) {
    return std::min(j1, list != nullptr ? jb + kKeyBlock : (jb / kKeyBlock + 1) * kKeyBlock);
  }

  // Attend the unit's rows over list entries [j0, j1) (positions j0..j1-1 without a list).
  void run(const Unit& w, const int32_t* list, int64_t L, int64_t j0, int64_t j1) {
    const int D = p.D, Dv = p.Dv, rph = shp.rows_per_head;
    for (int i = 0; i < rows; ++i) {
      const int r = w.r0 + i % rph, g = r / p.Tq, t = r % p.Tq, h = (w.hk0 + i / rph) * p.G + g;
      float* qr = &qf[i * D];
      if (p.q_f32) {
        const float* src = static_cast<const float*>(p.q) + w.b * p.q_sb + t * p.q_st + h * p.q_sh;
        std::memcpy(qr, src, sizeof(float) * D);
      } else {
        load_row(static_cast<const T*>(p.q) + w.b * p.q_sb + t * p.q_st + h * p.q_sh, qr, D);
      }
      scale_row(qr, p.scale, D);
      limit[i] = p.causal ? L - p.Tq + t : INT64_MAX;
      first[i] = p.causal && p.window_left >= 0 ? L - p.Tq + t - p.window_left : INT64_MIN;
      m[i] = kNegInf;
      l[i] = 0.0f;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    // Keys every row sees: blocks inside [see_lo, see_hi] need no mask.
    int64_t see_lo = INT64_MIN, see_hi = INT64_MAX;
    if (p.causal) {  // no row sees past the last row's limit
      int64_t last = INT64_MIN;
      for (int i = 0; i < rows; ++i) {
        last = std::max(last, limit[i]);
        see_lo = std::max(see_lo, first[i]);
        see_hi = std::min(see_hi, limit[i]);
      }
      j1 = std::min(j1, last + 1);
    }
    const T* kbase = static_cast<const T*>(p.k);
    const T* vbase = static_cast<const T*>(p.v);
    const float* krow[kKeyBlock];
    const float* vrow[kKeyBlock];
    // Offsets of the current block and of the next one (computed a block ahead for the prefetch).
    int64_t pos_buf[2][kKeyBlock], koff_buf[2][kKeyBlock], voff_buf[2][kKeyBlock];
    int cur = 0;
    if (j0 < j1) block_rows(w.b, list, j0, block_end(list, j0, j1), pos_buf[0], koff_buf[0], voff_buf[0]);
    for (int64_t jb = j0; jb < j1;) {
      const int64_t je = block_end(list, jb, j1), jn_end = je < j1 ? block_end(list, je, j1) : je;
      const int n = static_cast<int>(je - jb);
      const int64_t* koff = koff_buf[cur];
      const int64_t* voff = voff_buf[cur];
      const int64_t* bpos = pos_buf[cur];
      // Successive rows of one head are Hk * D apart (a 4 KiB page per position for typical
      // sizes) and hardware prefetchers stop at page boundaries: the next block's rows go to L2
      // during this block, each head's rows to L1 just before its microkernels.
      if (je < jn_end) {
        const int nx = cur ^ 1, nn = static_cast<int>(jn_end - je);
        block_rows(w.b, list, je, jn_end, pos_buf[nx], koff_buf[nx], voff_buf[nx]);
        for (int jj = 0; jj < nn; ++jj) {
          const T* kn = kbase + koff_buf[nx][jj];
          const T* vn = vbase + voff_buf[nx][jj];
          for (int ih = 0; ih < shp.heads; ++ih) {
            prefetch_row<1>(kn + (w.hk0 + ih) * p.k_sh, D);
            prefetch_row<1>(vn + (w.hk0 + ih) * p.v_sh, Dv);
          }
        }
      }
      bool mask = false;
      if (p.causal) {
        for (int jj = 0; jj < n; ++jj) mask |= bpos[jj] < see_lo || bpos[jj] > see_hi;
      }
      for (int ih = 0; ih < shp.heads; ++ih) {
        const T* kh = kbase + (w.hk0 + ih) * p.k_sh;
        const T* vh = vbase + (w.hk0 + ih) * p.v_sh;
        for (int jj = 0; jj < n; ++jj) {
          prefetch_row<3>(kh + koff[jj], D);
          prefetch_row<3>(vh + voff[jj], Dv);
        }
        for (int jj = 0; jj < n; ++jj) {
          if constexpr (kF32) {
            krow[jj] = kh + koff[jj];
            vrow[jj] = vh + voff[jj];
          } else {
            load_row(kh + koff[jj], &kbuf[jj * D], D);
            load_row(vh + voff[jj], &vbuf[jj * Dv], Dv);
            krow[jj] = &kbuf[jj * D];
            vrow[jj] = &vbuf[jj * Dv];
          }
        }
        head_block(ih * rph, rph, n, krow, vrow, bpos, mask);
      }
      cur ^= 1;
      jb = je;
    }
  }

  // The rows [i0, i0 + nrows) of one KV head against a block of n keys: scores, online softmax
  // update, acc += p @ V. Rows go through the microkernels four at a time.
  void head_block(int i0, int nrows, int n, const float* const* krow, const float* const* vrow, const int64_t* pos,
                  bool mask) {
    const int D = p.D, Dv = p.Dv;
    for_row_blocks(i0, nrows, [&](auto rb, int i) {
      scores_rows<decltype(rb)::value>(&qf[i * D], D, krow, n, &sc[i * kKeyBlock], kKeyBlock);
    });
    for (int i = i0; i < i0 + nrows; ++i) {
      float* s = &sc[i * kKeyBlock];
      if (p.softcap > 0.0f) {
        const float c = p.softcap, inv = 1.0f / p.softcap;
        for (int jj = 0; jj < n; ++jj) s[jj] = c * std::tanh(s[jj] * inv);
      }
      if (mask) {
        for (int jj = 0; jj < n; ++jj)
          if (pos[jj] > limit[i] || pos[jj] < first[i]) s[jj] = kNegInf;
      }
      const float mnew = nan_max(m[i], max_of(s, n));
      if (mnew == kNegInf) {  // nothing visible yet: every probability is zero
        std::fill(s, s + n, 0.0f);
        continue;
      }
      const float alpha = exp_approx(m[i] - mnew);
      l[i] = l[i] * alpha + exp_sub_sum(s, mnew, n);
      if (alpha != 1.0f) scale_row(&acc[i * Dv], alpha, Dv);
      m[i] = mnew;
    }
    for_row_blocks(i0, nrows, [&](auto rb, int i) {
      pv_rows<decltype(rb)::value>(&acc[i * Dv], Dv, &sc[i * kKeyBlock], kKeyBlock, vrow, n);
    });
  }

  // Calls f(std::integral_constant<int, RB>, first row) over [i0, i0 + n) in blocks of 4, 2, 1.
  template <typename F>
  static void for_row_blocks(int i0, int n, F&& f) {
    int i = i0;
    for (; i + 4 <= i0 + n; i += 4) f(std::integral_constant<int, 4>{}, i);
    if (i + 2 <= i0 + n) {
      f(std::integral_constant<int, 2>{}, i);
      i += 2;
    }
    if (i < i0 + n) f(std::integral_constant<int, 1>{}, i);
  }
};

// Writes acc / l of a unit's rows to out [B, Tq, H, Dv].
template <typename T>
inline void write_rows(const AttendParams& p, const AttendShape& shp, const Unit& w, const float* acc,
                       const float* l) {
  const int H = p.Hk * p.G, rph = shp.rows_per_head;
  for (int i = 0; i < shp.heads * rph; ++i) {
    const int r = w.r0 + i % rph, g = r / p.Tq, t = r % p.Tq, h = (w.hk0 + i / rph) * p.G + g;
    T* o = static_cast<T*>(p.out) + ((static_cast<int64_t>(w.b) * p.Tq + t) * H + h) * p.Dv;
    const float inv = l[i] == 0.0f ? 0.0f : 1.0f / l[i];  // a row that saw no key outputs zeros
    for (int d = 0; d < p.Dv; ++d) o[d] = from_float<T>(acc[i * p.Dv + d] * inv);
  }
}

template <typename T>
void run_attend(const AttendParams& p) {
  const AttendShape shp = attend_shape(p);
  const int64_t units = shp.units;
  if (units == 0 || p.Dv == 0) return;
  int64_t max_keys = 0;
  for (int64_t u = 0; u < units; ++u) {
    const int32_t* list;
    const Unit w = unit_of(p, shp, u);
    const int64_t n = unit_keys(p, w, &list);
    max_keys = std::max(max_keys, n - std::min(n, unit_first(p, w, list)));
  }
  // Split the keys when there are fewer units than about two per thread (flash-decoding).
  const int64_t threads = at::get_num_threads();
  int64_t nsplit = 1;
  if (units < 2 * threads) {
    nsplit = std::min(ceil_div(2 * threads, units), std::max<int64_t>(1, max_keys / kMinSplit));
  }
  const int64_t split_len = std::max<int64_t>(1, ceil_div(max_keys, nsplit));
  // Split boundaries of decode lists fall on multiples of `align` positions: whole key blocks,
  // and whole pages of a paged cache (lcm of kKeyBlock and block_size), so no page is shared
  // between two splits, unless that multiple exceeds a split (pages longer than a split: kept
  // whole, they would unbalance the splits). Selected lists split anywhere.
  const bool dense = p.sel_idx == nullptr;
  int64_t align = 1;
  if (dense) {
    align = kKeyBlock;
    if (p.block_table != nullptr) {
      const int64_t page_align = align / std::gcd<int64_t>(align, p.block_size) * p.block_size;
      if (page_align <= split_len) align = page_align;
    }
  }
  // First entry of split k of a unit whose keys are [start, n).
  auto bound = [&](int64_t start, int64_t n, int64_t k) -> int64_t {
    if (k == 0) return std::min(start, n);
    if (k == nsplit) return n;
    const int64_t x = start + k * split_len;
    return std::min(n, std::max(start, (x + align / 2) / align * align));  // nearest multiple
  };
  const int rows = shp.heads * shp.rows_per_head;
  const int stride = p.Dv + 2;  // partial state per row: acc [Dv], m, l
  std::vector<float> part(nsplit > 1 ? units * nsplit * rows * stride : 0);

  at::parallel_for(0, units * nsplit, 1, [&](int64_t begin, int64_t end) {
    AttendWorker<T> wk(p, shp);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t u = it / nsplit, split = it % nsplit;
      const Unit w = unit_of(p, shp, u);
      const int32_t* list;
      const int64_t n = unit_keys(p, w, &list);
      const int64_t L = static_cast<int64_t>(p.lens[w.b]) + p.len_add;
      const int64_t start = unit_first(p, w, list);
      const int64_t j0 = bound(start, n, split), j1 = bound(start, n, split + 1);
      wk.run(w, list, L, j0, j1);
      if (nsplit == 1) {
        write_rows<T>(p, shp, w, wk.acc.data(), wk.l.data());
      } else {
        float* dst = &part[it * rows * stride];
        for (int i = 0; i < rows; ++i) {
          std::memcpy(dst + i * stride, &wk.acc[i * p.Dv], sizeof(float) * p.Dv);
          dst[i * stride + p.Dv] = wk.m[i];
          dst[i * stride + p.Dv + 1] = wk.l[i];
        }
      }
    }
  });
  if (nsplit == 1) return;

  // Merge the splits of every row: o = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(rows * p.Dv), l(rows);
    for (int64_t u = begin; u < end; ++u) {
      for (int i = 0; i < rows; ++i) {
        float M = kNegInf;
        for (int64_t s = 0; s < nsplit; ++s) M = nan_max(M, part[((u * nsplit + s) * rows + i) * stride + p.Dv]);
        float* a = &acc[i * p.Dv];
        std::fill(a, a + p.Dv, 0.0f);
        l[i] = 0.0f;
        if (M == kNegInf) continue;
        for (int64_t s = 0; s < nsplit; ++s) {
          const float* src = &part[((u * nsplit + s) * rows + i) * stride];
          if (src[p.Dv] == kNegInf) continue;  // an empty split
          const float f = std::exp(src[p.Dv] - M);
          l[i] += src[p.Dv + 1] * f;
          axpy(a, f, src, p.Dv);
        }
      }
      write_rows<T>(p, shp, unit_of(p, shp, u), acc.data(), l.data());
    }
  });
}

inline void attend(const AttendParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return run_attend<float>(p);
    case DType::kFloat16: return run_attend<c10::Half>(p);
    case DType::kBFloat16: return run_attend<c10::BFloat16>(p);
  }
}

}  // namespace cpu
}  // namespace attnkit
