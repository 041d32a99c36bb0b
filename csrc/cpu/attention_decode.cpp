// CPU attention_decode: in-place append of k_new/v_new, then split-KV GQA decode (cpu/attend.h).
#include "attend.h"

namespace attnkit {
namespace cpu {

namespace {

template <typename T>
void append_rows(const AppendParams& a) {
  // One (b, t, hk) row of K and of V per item; rows are distinct (for a paged cache the caller
  // checked that no two rows append into one slot), so writes never overlap.
  const int64_t n = static_cast<int64_t>(a.B) * a.Tq * a.Hk;
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int b = static_cast<int>(i / (a.Tq * a.Hk)), t = static_cast<int>(i / a.Hk % a.Tq);
      const int hk = static_cast<int>(i % a.Hk);
      const int64_t s = static_cast<int64_t>(a.lens[b]) + t;
      const int64_t ko = cache_offset(a.block_table, a.bt_stride, a.block_size, b, s, a.k_sb, a.k_ss);
      const int64_t vo = cache_offset(a.block_table, a.bt_stride, a.block_size, b, s, a.v_sb, a.v_ss);
      std::memcpy(static_cast<T*>(a.k) + ko + hk * a.k_sh,
                  static_cast<const T*>(a.k_new) + b * a.kn_sb + t * a.kn_st + hk * a.kn_sh, sizeof(T) * a.D);
      std::memcpy(static_cast<T*>(a.v) + vo + hk * a.v_sh,
                  static_cast<const T*>(a.v_new) + b * a.vn_sb + t * a.vn_st + hk * a.vn_sh, sizeof(T) * a.Dv);
    }
  });
}

}  // namespace

void attention_decode(const AttendParams& p, const AppendParams* append) {
  if (append != nullptr) {
    switch (append->dtype) {
      case DType::kFloat32: append_rows<float>(*append); break;
      case DType::kFloat16: append_rows<c10::Half>(*append); break;
      case DType::kBFloat16: append_rows<c10::BFloat16>(*append); break;
    }
  }
  attend(p);
}

}  // namespace cpu
}  // namespace attnkit
