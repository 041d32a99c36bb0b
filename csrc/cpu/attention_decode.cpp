// CPU attention_decode: in-place append of k_new/v_new, then split-KV GQA decode (cpu/attend.h).
#include "attend.h"

namespace attnkit {
namespace cpu {

namespace {

template <typename T>
void append_rows(const AppendParams& a) {
  // One (b, t, hk) row of K and of V per item; rows are distinct, so writes never overlap.
  const int64_t n = static_cast<int64_t>(a.B) * a.Tq * a.Hk;
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int b = static_cast<int>(i / (a.Tq * a.Hk)), t = static_cast<int>(i / a.Hk % a.Tq);
      const int hk = static_cast<int>(i % a.Hk);
      const int64_t s = static_cast<int64_t>(a.lens[b]) + t;
      std::memcpy(static_cast<T*>(a.k) + b * a.k_sb + s * a.k_ss + hk * a.k_sh,
                  static_cast<const T*>(a.k_new) + b * a.kn_sb + t * a.kn_st + hk * a.kn_sh, sizeof(T) * a.D);
      std::memcpy(static_cast<T*>(a.v) + b * a.v_sb + s * a.v_ss + hk * a.v_sh,
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
