// CPU loki_attention_decode: rotate q, low-rank scores, per-list top-k, sparse attention.
// Contiguous [B, Smax, Hk, D] or paged [num_blocks, block_size, Hk, D] caches (block_table).
#include <numeric>

#include "attend.h"

namespace attnkit {
namespace cpu {

namespace {

// Order-preserving map of a float to uint32 (NaN ranks highest, as in torch.topk).
inline uint32_t order_key(float f) {
  if (f != f) return 0xFFFFFFFFu;
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Rows a paged walk prefetches ahead of the one it scores: about 32 (at least one page).
constexpr int64_t kPrefetchRows = 32;

// Calls f(s, off) for s in [s0, s1) of batch row b, with off the element offset of position s's
// row (head 0) in a cache of batch (or block) stride sb and position stride ss. Paged caches are
// walked page by page: one block-table read per page, consecutive rows inside it. Pages sit
// anywhere in the pool, so the hardware prefetcher loses the stream at every page boundary: the
// walk calls pf(off) for the rows of the page `ahead` pages on (about kPrefetchRows rows) when it
// reads that page's table entry, and keeps the entry until it gets there.
template <typename F, typename P>
inline void for_each_position(const LokiParams& p, int b, int64_t s0, int64_t s1, int64_t sb, int64_t ss, F&& f,
                              P&& pf) {
  if (s0 >= s1) return;
  if (p.block_table == nullptr) {
    for (int64_t s = s0; s < s1; ++s) f(s, b * sb + s * ss);
    return;
  }
  const int32_t* table = p.block_table + b * p.bt_stride;
  const int64_t bs = p.block_size, first = s0 / bs, last = (s1 - 1) / bs;
  const int64_t ahead = std::max<int64_t>(1, kPrefetchRows / bs);
  constexpr int kRing = kPrefetchRows + 1;  // > ahead: entries read and not yet walked
  int64_t base[kRing];                      // per page: its entry's offset minus page * bs * ss
  auto fetch = [&](int64_t page) {
    base[page % kRing] = static_cast<int64_t>(table[page]) * sb - page * bs * ss;  // + s * ss: offset of s
    // the first kPrefetchRows rows of a long page: the hardware prefetcher follows inside it
    const int64_t lo = std::max(s0, page * bs), hi = std::min({s1, (page + 1) * bs, lo + kPrefetchRows});
    for (int64_t s = lo; s < hi; ++s) pf(base[page % kRing] + s * ss);
  };
  for (int64_t page = first; page <= std::min(last, first + ahead - 1); ++page) fetch(page);
  for (int64_t page = first; page <= last; ++page) {
    if (page + ahead <= last) fetch(page + ahead);
    const int64_t off = base[page % kRing];
    const int64_t end = std::min(s1, (page + 1) * bs);
    for (int64_t s = std::max(s0, page * bs); s < end; ++s) f(s, off + s * ss);
  }
}

template <typename T>
void rotate_and_score(const LokiParams& p) {
  const int H = p.H, D = p.D, G = p.G, rank = p.rank;
  const int Gs = p.group ? 1 : G;
  // q_rot[b, h] = q[b, 0, h] @ components[h // G]: [D] @ [D, D] -> [D]
  at::parallel_for(0, static_cast<int64_t>(p.B) * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D);
    for (int64_t i = begin; i < end; ++i) {
      const int b = static_cast<int>(i / H), h = static_cast<int>(i % H);
      load_row(static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh, qf.data(), D);
      float* out = p.q_rot + i * D;
      const float* C = p.components + static_cast<int64_t>(h / G) * D * D;
      std::fill(out, out + D, 0.0f);
      for (int d = 0; d < D; ++d) axpy(out, qf[d], C + static_cast<int64_t>(d) * D, D);
    }
  });
  // scores[b, hk, gs, s] = q_rot[:rank] . k_rot[s, :rank] (max over the group for "group").
  // Chunks of about 1024 positions; paged, a whole number of pages (no page is split between two).
  const int64_t kChunk = p.block_table == nullptr ? 1024 : ceil_div(1024, p.block_size) * p.block_size;
  const int64_t chunks = ceil_div(std::max<int64_t>(p.Smax, 1), kChunk);
  at::parallel_for(0, static_cast<int64_t>(p.B) * p.Hk * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(rank);
    for (int64_t i = begin; i < end; ++i) {
      const int b = static_cast<int>(i / (p.Hk * chunks)), hk = static_cast<int>(i / chunks % p.Hk);
      const int64_t s0 = i % chunks * kChunk, s1 = std::min<int64_t>(p.lens[b], s0 + kChunk);
      const float* qr = p.q_rot + (static_cast<int64_t>(b) * H + hk * G) * D;
      float* sc = p.scores + (static_cast<int64_t>(b) * p.Hk + hk) * Gs * p.Smax;
      const T* kh = static_cast<const T*>(p.k) + hk * p.k_sh;
      for_each_position(p, b, s0, s1, p.k_sb, p.k_ss, [&](int64_t s, int64_t off) {
        const T* kp = kh + off;
        const float* kr;
        if constexpr (std::is_same<T, float>::value) {
          kr = kp;
        } else {
          load_row(kp, kf.data(), rank);
          kr = kf.data();
        }
        if (p.group) {
          float best = kNegInf;
          for (int g = 0; g < G; ++g) best = nan_max(best, dot(qr + g * D, kr, rank));
          sc[s] = best;
        } else {
          for (int g = 0; g < G; ++g) sc[g * p.Smax + s] = dot(qr + g * D, kr, rank);
        }
      }, [&](int64_t off) { prefetch_row<3>(kh + off, rank); });
    }
  });
}

// The top_k positions of every list (all valid positions when the row is not longer than top_k),
// in ascending position order for a forward-streaming gather.
void select_top_k(const LokiParams& p) {
  const int Gs = p.group ? 1 : p.G;
  at::parallel_for(0, static_cast<int64_t>(p.B) * p.Hk * Gs, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keyed;
    for (int64_t li = begin; li < end; ++li) {
      const int b = static_cast<int>(li / (p.Hk * Gs));
      const int64_t L = p.lens[b];
      int32_t* idx = p.sel_idx + li * p.top_k;
      if (L <= p.top_k) {
        std::iota(idx, idx + L, 0);
        p.sel_count[li] = static_cast<int32_t>(L);
        continue;
      }
      const float* sc = p.scores + li * p.Smax;
      // (order key << 32 | ~position): one integer comparison per step; ties go to the lower position.
      keyed.resize(L);
      for (int64_t s = 0; s < L; ++s)
        keyed[s] = (static_cast<uint64_t>(order_key(sc[s])) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(s));
      std::nth_element(keyed.begin(), keyed.begin() + (p.top_k - 1), keyed.end(), std::greater<uint64_t>());
      for (int64_t j = 0; j < p.top_k; ++j) idx[j] = static_cast<int32_t>(~static_cast<uint32_t>(keyed[j]));
      std::sort(idx, idx + p.top_k);
      p.sel_count[li] = static_cast<int32_t>(p.top_k);
    }
  });
}

}  // namespace

void loki_attention_decode(const LokiParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: rotate_and_score<float>(p); break;
    case DType::kFloat16: rotate_and_score<c10::Half>(p); break;
    case DType::kBFloat16: rotate_and_score<c10::BFloat16>(p); break;
  }
  select_top_k(p);
  AttendParams a;
  a.dtype = p.dtype;
  a.B = p.B;
  a.Hk = p.Hk;
  a.G = p.G;
  a.Tq = 1;
  a.D = p.D;
  a.Dv = p.Dv;
  a.scale = p.scale;
  a.q = p.q_rot;  // exact scores use the rotated q against the full rotated keys
  a.q_f32 = true;
  a.q_sb = static_cast<int64_t>(p.H) * p.D;
  a.q_st = 0;
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
  a.sel_rows = p.group ? 1 : p.G;
  a.sel_cap = p.top_k;
  a.out = p.out;
  attend(a);
}

}  // namespace cpu
}  // namespace attnkit
