// Kernel parameter blocks shared by the CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda) and
// the bindings (csrc/bindings.cpp).
//
// Plain C++ only (no torch, no CUDA headers): the .cu files compile with nvcc against nothing but
// the CUDA toolkit, and the bindings fill these structs from torch tensors. Pointers are raw
// device (or host) pointers, strides are in elements, and the last dim of every tensor is
// contiguous. See docs/native.md for the design.
#pragma once

#include <cstdint>
#include <string>

namespace attnkit {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class FeatureMap : int32_t { kNone = 0, kElu = 1, kRelu = 2 };

enum class NormMode : int32_t { kRms = 0, kL2 = 1 };

// Softmax attention of the query rows of one KV head over a list of key positions.
//
// The rows of KV head `hk` are `r = g * Tq + t` (query head `h = hk * G + g`, query step `t`).
// Keys are either the positions `0 .. L_b - 1` with `L_b = lens[b] + len_add` (decode), or, when
// `sel_idx` is set, the positions `sel_idx[((b * Hk + hk) * sel_rows + srow) * sel_cap + j]` for
// `j < sel_count[...]` (Loki), where `srow` is the row when `sel_rows > 1` (one list per query
// head) and 0 otherwise (one list per KV head). With `causal`, row `r` sees the positions
// `s <= L_b - Tq + t` (bottom-right causal), and with `window_left >= 0` (decode lists only) also
// `s >= L_b - Tq + t - window_left`. With `softcap > 0` the scaled logits `x` become
// `softcap * tanh(x / softcap)`. With `block_table` (paged cache, decode lists only), position `s`
// of row `b` lives in block `block_table[b * bt_stride + s / block_size]` at offset
// `s % block_size`; `k_sb`/`v_sb` are then the strides of one block. `out [B, Tq, H, Dv]` is
// contiguous in `dtype`.
struct AttendParams {
  DType dtype = DType::kFloat32;
  int B = 0, Hk = 0, G = 0, Tq = 0, D = 0, Dv = 0;
  float scale = 1.0f;
  const void* q = nullptr;  // [B, Tq, H, D]; float32 when q_f32, else `dtype`
  bool q_f32 = false;
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  const void* k = nullptr;  // [B, Smax, Hk, D]
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  const void* v = nullptr;  // [B, Smax, Hk, Dv]
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  const int32_t* lens = nullptr;  // [B]
  int len_add = 0;
  bool causal = false;
  const int32_t* sel_idx = nullptr;
  const int32_t* sel_count = nullptr;
  int sel_rows = 1;
  int64_t sel_cap = 0;
  int64_t window_left = -1;
  float softcap = 0.0f;
  const int32_t* block_table = nullptr;
  int64_t bt_stride = 0;
  int block_size = 1;
  void* out = nullptr;
};

// Element offset of token `s` of row `b` in a cache with batch (or block) stride `sb` and token
// stride `ss`: contiguous `b * sb + s * ss`, paged through the block table.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t cache_offset(const int32_t* block_table, int64_t bt_stride, int block_size, int b, int64_t s,
                            int64_t sb, int64_t ss) {
  if (block_table == nullptr) return b * sb + s * ss;
  return static_cast<int64_t>(block_table[b * bt_stride + s / block_size]) * sb + (s % block_size) * ss;
}

// In-place append of `k_new [B, Tq, Hk, D]`, `v_new [B, Tq, Hk, Dv]` at rows `lens[b] + t`
// (through `block_table` when paged, as in AttendParams).
struct AppendParams {
  DType dtype = DType::kFloat32;
  int B = 0, Tq = 0, Hk = 0, D = 0, Dv = 0;
  const void* k_new = nullptr;
  int64_t kn_sb = 0, kn_st = 0, kn_sh = 0;
  const void* v_new = nullptr;
  int64_t vn_sb = 0, vn_st = 0, vn_sh = 0;
  void* k = nullptr;
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  void* v = nullptr;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  const int32_t* lens = nullptr;
  const int32_t* block_table = nullptr;
  int64_t bt_stride = 0;
  int block_size = 1;
};

// Loki: rotate q with its KV head's basis, score the valid positions with the first `rank` dims,
// select the `top_k` best per (row, head) or per (row, KV head), attend over those.
struct LokiParams {
  DType dtype = DType::kFloat32;
  int B = 0, H = 0, Hk = 0, G = 0, D = 0, Dv = 0, rank = 0;
  int64_t Smax = 0, top_k = 0;  // top_k is already min(top_k, Smax)
  bool group = false;           // selection="group": one list per KV head (max over its heads)
  float scale = 1.0f;
  const void* q = nullptr;  // [B, 1, H, D] in dtype
  int64_t q_sb = 0, q_sh = 0;
  const float* components = nullptr;  // [Hk, D, D] float32, contiguous
  const void* k = nullptr;            // rotated keys [B, Smax, Hk, D]
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  const void* v = nullptr;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  const int32_t* lens = nullptr;
  // Paged caches (as in AttendParams): k/v are [num_blocks, block_size, Hk, D/Dv], k_sb/v_sb the
  // strides of one block, position s of row b in block block_table[b * bt_stride + s / block_size]
  // at offset s % block_size; Smax = bt_stride * block_size. Null for contiguous caches.
  const int32_t* block_table = nullptr;
  int64_t bt_stride = 0;
  int block_size = 1;
  // Workspaces, allocated by the caller: q_rot [B, H, D], scores [B, Hk, Gs, Smax],
  // sel_idx [B, Hk, Gs, top_k], sel_count [B, Hk, Gs] (Gs = 1 if group else G).
  float* q_rot = nullptr;
  float* scores = nullptr;
  int32_t* sel_idx = nullptr;
  int32_t* sel_count = nullptr;
  void* out = nullptr;  // [B, 1, H, Dv] contiguous
};

// One decoding step of linear / lightning attention; `S` (and `z`) updated in place.
// State heads: `Hs = H` (lightning: state head = query head, KV head h / G) or `Hs = Hk` (linear:
// the G query heads of the KV head share the state).
struct LinearStepParams {
  DType dtype = DType::kFloat32;
  int B = 0, H = 0, Hk = 0, G = 0, Dk = 0, Dv = 0;
  bool lightning = false;
  FeatureMap feature_map = FeatureMap::kNone;
  bool normalize = false;
  float scale = 1.0f, eps = 0.0f;
  const void* q = nullptr;  // [B, 1, H, Dk]
  int64_t q_sb = 0, q_sh = 0;
  const void* k = nullptr;  // [B, 1, Hk, Dk]
  int64_t k_sb = 0, k_sh = 0;
  const void* v = nullptr;  // [B, 1, Hk, Dv]
  int64_t v_sb = 0, v_sh = 0;
  float* S = nullptr;  // [N, Hs, Dk, Dv], each [Dk, Dv] block contiguous
  int64_t S_sn = 0, S_sh = 0;
  float* z = nullptr;  // [N, Hk, Dk] when normalize
  int64_t z_sn = 0, z_sh = 0;
  const float* decay = nullptr;            // [H] float32 or null
  const int64_t* state_indices = nullptr;  // [B] or null (row b)
  void* out = nullptr;                     // [B, 1, H, Dv] contiguous
};

// Per-head RMS / L2 norm of `rows` contiguous rows of `D`; optionally followed by rotary
// embedding of the first `rot` dims (rotate_half convention) in place.
struct NormParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int D = 0;
  NormMode mode = NormMode::kRms;
  float eps = 0.0f;
  const void* x = nullptr;   // [rows, D] contiguous
  const float* w = nullptr;  // [D] float32 or null
  void* y = nullptr;         // [rows, D] contiguous
};

// In-place norm + RoPE of q [B, T, H, D] and k [B, T, Hk, D] (unit stride in the last dim).
// cos/sin: float32 [B or 1, T, rot] with batch stride `cs_sb` (0 when shared by every row).
struct NormRopeParams {
  DType dtype = DType::kFloat32;
  int B = 0, T = 0, H = 0, Hk = 0, D = 0, rot = 0;
  NormMode mode = NormMode::kRms;
  float eps = 0.0f;
  bool norm = true;
  void* q = nullptr;
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  void* k = nullptr;
  int64_t k_sb = 0, k_st = 0, k_sh = 0;
  const float* q_w = nullptr;  // [D] float32 or null
  const float* k_w = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t cs_sb = 0, cs_st = 0;
};

namespace cpu {
void attention_decode(const AttendParams& p, const AppendParams* append);
void loki_attention_decode(const LokiParams& p);
void linear_attention_step(const LinearStepParams& p);
void qk_norm(const NormParams& p);
void qk_norm_rope(const NormRopeParams& p);
}  // namespace cpu

// CUDA launchers (csrc/cuda/*.cu). `stream` is a cudaStream_t passed as an integer (from
// torch.cuda.current_stream().cuda_stream). Workspaces are allocated by the caller; the
// launchers never synchronise. They return an empty string on success, else the error.
namespace cuda {
struct Workspace {
  float* part_o = nullptr;   // [B * Tq * H, nsplit, Dv]
  float* part_ml = nullptr;  // [B * Tq * H, nsplit, 2]
  int nsplit = 1;
  int64_t split_len = 0;  // keys per split, a multiple of the key tile
};
// Choose splits for `max_keys` keys per row list: enough blocks to fill `num_sms` SMs.
Workspace plan_splits(int B, int Hk, int G, int Tq, int64_t max_keys, bool per_head_lists, int num_sms);
std::string attention_decode(const AttendParams& p, const AppendParams* append, const Workspace& ws,
                             std::intptr_t stream);
std::string loki_attention_decode(const LokiParams& p, const Workspace& ws, std::intptr_t stream);
std::string linear_attention_step(const LinearStepParams& p, std::intptr_t stream);
std::string qk_norm(const NormParams& p, std::intptr_t stream);
std::string qk_norm_rope(const NormRopeParams& p, std::intptr_t stream);
// Whether (D, Dv, dtype) and the pointers/strides suit the 16-byte vector loads.
bool attend_supported(const AttendParams& p);
}  // namespace cuda

}  // namespace attnkit
