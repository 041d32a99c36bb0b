// pybind11 bindings of the attnkit native extension (built by attnkit/native/_build.py).
//
// Every function takes torch tensors that attnkit/native/_ops.py has already validated and put
// in kernel form (unit stride in the last dim, float32 states and weights, int32/int64 indices).
// The checks here are a last guard against misuse of this private module, not user validation.
// CPU tensors run the kernels in csrc/cpu; CUDA tensors (only when compiled with
// ATTNKIT_WITH_CUDA) run csrc/cuda on the stream passed in as an integer (a cudaStream_t from
// torch.cuda.current_stream().cuda_stream): the .cu files then need no torch headers.
#include <torch/extension.h>

#include <optional>

#include "attnkit_native.h"

namespace attnkit {
namespace {

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "attnkit native: unsupported dtype ", x.scalar_type());
  }
}

void check_rows(const char* name, const at::Tensor& x, int64_t ndim) {
  TORCH_CHECK(x.dim() == ndim, "attnkit native: ", name, " must have ", ndim, " dims, got ", x.dim());
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, "attnkit native: ", name,
              " must have unit stride in the last dim");
}

void check_device(const at::Tensor& ref, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others)
    TORCH_CHECK(t->device() == ref.device(), "attnkit native: tensors must share one device");
}

bool on_cuda(const at::Tensor& x) {
  if (!x.is_cuda()) {
    TORCH_CHECK(x.is_cpu(), "attnkit native: tensors must be on the CPU or a CUDA device");
    return false;
  }
#ifdef ATTNKIT_WITH_CUDA
  return true;
#else
  TORCH_CHECK(false, "attnkit native: this build has no CUDA kernels (torch without CUDA at build time)");
#endif
}

#ifdef ATTNKIT_WITH_CUDA
void check_launch(const std::string& err) { TORCH_CHECK(err.empty(), "attnkit native CUDA: ", err); }

cuda::Workspace split_workspace(const at::Tensor& like, int B, int Hk, int G, int Tq, int Dv, int64_t max_keys,
                                bool per_head_lists, int64_t num_sms, at::Tensor& part_o, at::Tensor& part_ml) {
  cuda::Workspace ws = cuda::plan_splits(B, Hk, G, Tq, max_keys, per_head_lists, static_cast<int>(num_sms));
  if (ws.nsplit > 1) {
    const int64_t rows = static_cast<int64_t>(B) * Tq * Hk * G;
    part_o = at::empty({rows, ws.nsplit, Dv}, like.options().dtype(at::kFloat));
    part_ml = at::empty({rows, ws.nsplit, 2}, like.options().dtype(at::kFloat));
    ws.part_o = part_o.data_ptr<float>();
    ws.part_ml = part_ml.data_ptr<float>();
  }
  return ws;
}
#endif

// ------------------------------------------------------------------------------ attention_decode

at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                            const std::optional<at::Tensor>& v_new, double scale, int64_t window_left,
                            double softcap, const std::optional<at::Tensor>& block_table, int64_t stream,
                            int64_t num_sms) {
  check_rows("q", q, 4);
  check_rows("k_cache", k_cache, 4);
  check_rows("v_cache", v_cache, 4);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(),
              "attnkit native: cache_seqlens must be contiguous int32");
  check_device(q, {&k_cache, &v_cache, &cache_seqlens});
  const int B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int Hk = k_cache.size(2), Dv = v_cache.size(3);
  auto out = at::empty({B, Tq, H, Dv}, q.options());
  AttendParams p;
  p.dtype = dtype_of(q);
  p.B = B;
  p.Hk = Hk;
  p.G = H / Hk;
  p.Tq = Tq;
  p.D = D;
  p.Dv = Dv;
  p.scale = static_cast<float>(scale);
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_st = q.stride(1);
  p.q_sh = q.stride(2);
  p.k = k_cache.data_ptr();
  p.k_sb = k_cache.stride(0);
  p.k_ss = k_cache.stride(1);
  p.k_sh = k_cache.stride(2);
  p.v = v_cache.data_ptr();
  p.v_sb = v_cache.stride(0);
  p.v_ss = v_cache.stride(1);
  p.v_sh = v_cache.stride(2);
  p.lens = cache_seqlens.data_ptr<int32_t>();
  p.causal = true;
  p.window_left = window_left;
  p.softcap = static_cast<float>(softcap);
  int64_t capacity = k_cache.size(1);  // keys a row can hold
  if (block_table.has_value()) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.is_contiguous() && bt.dim() == 2 && bt.size(0) == B,
                "attnkit native: block_table must be contiguous int32 [B, max_blocks]");
    check_device(q, {&bt});
    p.block_table = bt.data_ptr<int32_t>();
    p.bt_stride = bt.size(1);
    p.block_size = static_cast<int>(k_cache.size(1));
    capacity = bt.size(1) * k_cache.size(1);
  }
  p.out = out.data_ptr();
  AppendParams a;
  const bool append = k_new.has_value();
  if (append) {
    const at::Tensor& kn = *k_new;
    const at::Tensor& vn = *v_new;
    check_rows("k_new", kn, 4);
    check_rows("v_new", vn, 4);
    check_device(q, {&kn, &vn});
    a.dtype = p.dtype;
    a.B = B;
    a.Tq = Tq;
    a.Hk = Hk;
    a.D = D;
    a.Dv = Dv;
    a.k_new = kn.data_ptr();
    a.kn_sb = kn.stride(0);
    a.kn_st = kn.stride(1);
    a.kn_sh = kn.stride(2);
    a.v_new = vn.data_ptr();
    a.vn_sb = vn.stride(0);
    a.vn_st = vn.stride(1);
    a.vn_sh = vn.stride(2);
    a.k = k_cache.data_ptr();
    a.k_sb = p.k_sb;
    a.k_ss = p.k_ss;
    a.k_sh = p.k_sh;
    a.v = v_cache.data_ptr();
    a.v_sb = p.v_sb;
    a.v_ss = p.v_ss;
    a.v_sh = p.v_sh;
    a.lens = p.lens;
    a.block_table = p.block_table;
    a.bt_stride = p.bt_stride;
    a.block_size = p.block_size;
    p.len_add = Tq;
  }
  if (on_cuda(q)) {
#ifdef ATTNKIT_WITH_CUDA
    TORCH_CHECK(cuda::attend_supported(p), "attnkit native CUDA: head dims or alignment unsupported");
    at::Tensor part_o, part_ml;
    // Keys a query row can visit: the capacity, or the window (no host sync on cache_seqlens).
    const int64_t max_keys = window_left >= 0 ? std::min<int64_t>(capacity, window_left + Tq) : capacity;
    auto ws = split_workspace(q, B, Hk, p.G, Tq, Dv, max_keys, false, num_sms, part_o, part_ml);
    check_launch(cuda::attention_decode(p, append ? &a : nullptr, ws, stream));
#endif
  } else {
    pybind11::gil_scoped_release nogil;
    cpu::attention_decode(p, append ? &a : nullptr);
  }
  return out;
}

// ------------------------------------------------------------------------- loki_attention_decode

at::Tensor loki_attention_decode(const at::Tensor& q, const at::Tensor& k_cache_rot, const at::Tensor& v_cache,
                                 const at::Tensor& cache_seqlens, const at::Tensor& components, int64_t rank,
                                 int64_t top_k, double scale, bool group,
                                 const std::optional<at::Tensor>& block_table, int64_t stream, int64_t num_sms) {
  check_rows("q", q, 4);
  check_rows("k_cache_rot", k_cache_rot, 4);
  check_rows("v_cache", v_cache, 4);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(),
              "attnkit native: cache_seqlens must be contiguous int32");
  TORCH_CHECK(components.scalar_type() == at::kFloat && components.is_contiguous(),
              "attnkit native: components must be contiguous float32");
  check_device(q, {&k_cache_rot, &v_cache, &cache_seqlens, &components});
  const int B = q.size(0), H = q.size(2), D = q.size(3);
  // Paged: [num_blocks, block_size, Hk, D] caches, a row holds max_blocks * block_size positions.
  const bool paged = block_table.has_value();
  if (paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.is_contiguous() && bt.dim() == 2 && bt.size(0) == B,
                "attnkit native: block_table must be contiguous int32 [B, max_blocks]");
    check_device(q, {&bt});
    TORCH_CHECK(v_cache.size(0) == k_cache_rot.size(0) && v_cache.size(1) == k_cache_rot.size(1),
                "attnkit native: paged k_cache_rot and v_cache must have the same blocks");
  }
  const int64_t Smax = paged ? block_table->size(1) * k_cache_rot.size(1) : k_cache_rot.size(1);
  const int Hk = k_cache_rot.size(2), Dv = v_cache.size(3), G = H / Hk;
  const int Gs = group ? 1 : G;
  TORCH_CHECK(Smax >= 1 && top_k >= 1, "attnkit native: empty caches are handled by the caller");
  const int64_t kk = std::min<int64_t>(top_k, Smax);
  auto f32 = q.options().dtype(at::kFloat);
  auto i32 = q.options().dtype(at::kInt);
  auto out = at::empty({B, 1, H, Dv}, q.options());
  auto q_rot = at::empty({B, H, D}, f32);
  auto scores = at::empty({B, Hk, Gs, Smax}, f32);
  auto sel_idx = at::empty({B, Hk, Gs, kk}, i32);
  auto sel_count = at::empty({B, Hk, Gs}, i32);
  LokiParams p;
  p.dtype = dtype_of(q);
  p.B = B;
  p.H = H;
  p.Hk = Hk;
  p.G = G;
  p.D = D;
  p.Dv = Dv;
  p.rank = static_cast<int>(rank);
  p.Smax = Smax;
  p.top_k = kk;
  p.group = group;
  p.scale = static_cast<float>(scale);
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(2);
  p.components = components.data_ptr<float>();
  p.k = k_cache_rot.data_ptr();
  p.k_sb = k_cache_rot.stride(0);
  p.k_ss = k_cache_rot.stride(1);
  p.k_sh = k_cache_rot.stride(2);
  p.v = v_cache.data_ptr();
  p.v_sb = v_cache.stride(0);
  p.v_ss = v_cache.stride(1);
  p.v_sh = v_cache.stride(2);
  p.lens = cache_seqlens.data_ptr<int32_t>();
  if (paged) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.bt_stride = block_table->size(1);
    p.block_size = static_cast<int>(k_cache_rot.size(1));
  }
  p.q_rot = q_rot.data_ptr<float>();
  p.scores = scores.data_ptr<float>();
  p.sel_idx = sel_idx.data_ptr<int32_t>();
  p.sel_count = sel_count.data_ptr<int32_t>();
  p.out = out.data_ptr();
  if (on_cuda(q)) {
#ifdef ATTNKIT_WITH_CUDA
    at::Tensor part_o, part_ml;
    auto ws = split_workspace(q, B, Hk, G, 1, Dv, kk, !group, num_sms, part_o, part_ml);
    check_launch(cuda::loki_attention_decode(p, ws, stream));
#endif
  } else {
    pybind11::gil_scoped_release nogil;
    cpu::loki_attention_decode(p);
  }
  return out;
}

// ------------------------------------------------------------------------- linear_attention_step

at::Tensor linear_attention_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& S,
                                 const std::optional<at::Tensor>& z, bool lightning,
                                 const std::optional<at::Tensor>& decay, double scale, int64_t feature_map,
                                 double eps, const std::optional<at::Tensor>& state_indices, int64_t stream) {
  check_rows("q", q, 4);
  check_rows("k", k, 4);
  check_rows("v", v, 4);
  TORCH_CHECK(S.scalar_type() == at::kFloat && S.dim() == 4 && S.stride(3) == 1 && S.stride(2) == S.size(3),
              "attnkit native: S must be float32 with contiguous [Dk, Dv] blocks");
  check_device(q, {&k, &v, &S});
  const int B = q.size(0), H = q.size(2), Dk = q.size(3), Hk = k.size(2), Dv = v.size(3);
  auto out = at::empty({B, 1, H, Dv}, q.options());
  LinearStepParams p;
  p.dtype = dtype_of(q);
  p.B = B;
  p.H = H;
  p.Hk = Hk;
  p.G = H / Hk;
  p.Dk = Dk;
  p.Dv = Dv;
  p.lightning = lightning;
  p.feature_map = static_cast<FeatureMap>(feature_map);
  p.scale = static_cast<float>(scale);
  p.eps = static_cast<float>(eps);
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(2);
  p.k = k.data_ptr();
  p.k_sb = k.stride(0);
  p.k_sh = k.stride(2);
  p.v = v.data_ptr();
  p.v_sb = v.stride(0);
  p.v_sh = v.stride(2);
  p.S = S.data_ptr<float>();
  p.S_sn = S.stride(0);
  p.S_sh = S.stride(1);
  if (z.has_value()) {
    TORCH_CHECK(z->scalar_type() == at::kFloat && z->dim() == 3 && z->stride(2) == 1,
                "attnkit native: z must be float32 [N, Hk, Dk] with unit stride in the last dim");
    check_device(q, {&*z});
    p.normalize = true;
    p.z = z->data_ptr<float>();
    p.z_sn = z->stride(0);
    p.z_sh = z->stride(1);
  }
  if (decay.has_value()) {
    TORCH_CHECK(decay->scalar_type() == at::kFloat && decay->is_contiguous(),
                "attnkit native: decay must be contiguous float32");
    check_device(q, {&*decay});
    p.decay = decay->data_ptr<float>();
  }
  if (state_indices.has_value()) {
    TORCH_CHECK(state_indices->scalar_type() == at::kLong && state_indices->is_contiguous(),
                "attnkit native: state_indices must be contiguous int64");
    check_device(q, {&*state_indices});
    p.state_indices = state_indices->data_ptr<int64_t>();
  }
  p.out = out.data_ptr();
  if (on_cuda(q)) {
#ifdef ATTNKIT_WITH_CUDA
    check_launch(cuda::linear_attention_step(p, stream));
#endif
  } else {
    pybind11::gil_scoped_release nogil;
    cpu::linear_attention_step(p);
  }
  return out;
}

// ------------------------------------------------------------------------------------ qk_norm

at::Tensor qk_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, int64_t mode, double eps,
                   int64_t stream) {
  TORCH_CHECK(x.is_contiguous(), "attnkit native: x must be contiguous");
  auto y = at::empty_like(x);
  NormParams p;
  p.dtype = dtype_of(x);
  p.D = x.dim() == 0 ? 1 : x.size(-1);
  p.rows = p.D == 0 ? 0 : x.numel() / p.D;
  p.mode = static_cast<NormMode>(mode);
  p.eps = static_cast<float>(eps);
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous() && weight->numel() == p.D,
                "attnkit native: weight must be contiguous float32 [D]");
    check_device(x, {&*weight});
    p.w = weight->data_ptr<float>();
  }
  if (p.rows == 0) return y;
  if (on_cuda(x)) {
#ifdef ATTNKIT_WITH_CUDA
    check_launch(cuda::qk_norm(p, stream));
#endif
  } else {
    pybind11::gil_scoped_release nogil;
    cpu::qk_norm(p);
  }
  return y;
}

void qk_norm_rope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                   const std::optional<at::Tensor>& q_weight, const std::optional<at::Tensor>& k_weight, bool norm,
                   int64_t mode, double eps, int64_t stream) {
  check_rows("q", q, 4);
  check_rows("k", k, 4);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 3 &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes(),
              "attnkit native: cos/sin must be contiguous float32 [B or 1, T, rot]");
  check_device(q, {&k, &cos, &sin});
  NormRopeParams p;
  p.dtype = dtype_of(q);
  p.B = q.size(0);
  p.T = q.size(1);
  p.H = q.size(2);
  p.Hk = k.size(2);
  p.D = q.size(3);
  p.rot = cos.size(2);
  p.mode = static_cast<NormMode>(mode);
  p.eps = static_cast<float>(eps);
  p.norm = norm;
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_st = q.stride(1);
  p.q_sh = q.stride(2);
  p.k = k.data_ptr();
  p.k_sb = k.stride(0);
  p.k_st = k.stride(1);
  p.k_sh = k.stride(2);
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.cs_sb = cos.size(0) == 1 ? 0 : cos.stride(0);
  p.cs_st = cos.stride(1);
  for (auto [w, dst] : {std::pair{&q_weight, &p.q_w}, std::pair{&k_weight, &p.k_w}}) {
    if (w->has_value()) {
      TORCH_CHECK((*w)->scalar_type() == at::kFloat && (*w)->is_contiguous() && (*w)->numel() == p.D,
                  "attnkit native: norm weights must be contiguous float32 [D]");
      check_device(q, {&**w});
      *dst = (*w)->data_ptr<float>();
    }
  }
  if (static_cast<int64_t>(p.B) * p.T * (p.H + p.Hk) == 0) return;
  if (on_cuda(q)) {
#ifdef ATTNKIT_WITH_CUDA
    check_launch(cuda::qk_norm_rope(p, stream));
#endif
  } else {
    pybind11::gil_scoped_release nogil;
    cpu::qk_norm_rope(p);
  }
}

}  // namespace
}  // namespace attnkit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnkit native kernels (CPU, and CUDA when built with it); see docs/native.md";
#ifdef ATTNKIT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("attention_decode", &attnkit::attention_decode);
  m.def("loki_attention_decode", &attnkit::loki_attention_decode);
  m.def("linear_attention_step", &attnkit::linear_attention_step);
  m.def("qk_norm", &attnkit::qk_norm);
  m.def("qk_norm_rope_", &attnkit::qk_norm_rope_);
}
