// Torch-facing wrappers of the expert_conv kernels: input checks, launch on the current stream.
// Outputs and scratch are allocated by the Python side (moce_kernels/cuda/expert_conv.py, experts.py,
// through the shared driver moce_kernels/ops/grouped_conv.py) and passed in; every op returns nothing.
// Ops (namespace moce_C): xc_pwdw, xc_pwdw_bwd, xc_gemm, xc_wgrad, xc_final_fwd, xc_final_bwd, xc_gather_sum.
#include "expert_conv/ops.h"

#include "common/torch_device.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "expert_conv/kernels.h"

namespace moce {
namespace {

using expert_conv::DType;
using OptT = std::optional<at::Tensor>;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "moce_C expert_conv: ", what, " failed: ", cudaGetErrorString(err));
}

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "expert_conv (cuda): ", name, " must be float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return DType::kFloat32;
}

void check(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(on_kernel_device(t), "expert_conv (cuda): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "expert_conv (cuda): ", name, " is on ", t.device(), ", expected ",
              like.device());
  TORCH_CHECK(t.is_contiguous(), "expert_conv (cuda): ", name, " must be contiguous");
}

// A tensor of the activation dtype T (same as like).
void check_t(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check(t, name, like);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "expert_conv (cuda): ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
}

void check_f32(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "expert_conv (cuda): ", name, " must be float32");
}

const int64_t* i64(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kLong, "expert_conv (cuda): ", name, " must be int64");
  return t.data_ptr<int64_t>();
}

const int64_t* opt_i64(const OptT& t, const char* name, const at::Tensor& like) {
  return t.has_value() ? i64(*t, name, like) : nullptr;
}

const void* opt_t(const OptT& t, const char* name, const at::Tensor& like) {
  if (!t.has_value()) return nullptr;
  check_t(*t, name, like);
  return t->data_ptr();
}

// meta: (E, 16) int64; offsets: (E+1,) int64. Returns E.
int check_meta(const at::Tensor& meta, const at::Tensor& offsets, const at::Tensor& like) {
  i64(meta, "meta", like);
  i64(offsets, "offsets", like);
  TORCH_CHECK(meta.dim() == 2 && meta.size(1) == 16, "expert_conv (cuda): meta must be (E, 16)");
  TORCH_CHECK(offsets.numel() == meta.size(0) + 1, "expert_conv (cuda): offsets must have E+1 entries");
  return (int)meta.size(0);
}

int to_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, "expert_conv (cuda): ", name, " out of range: ", v);
  return (int)v;
}

void xc_pwdw(const at::Tensor& src, const at::Tensor& w, const at::Tensor& dw, const OptT& pb,
             const OptT& db, at::Tensor& out, const at::Tensor& offsets, const at::Tensor& meta,
             const OptT& perm, int64_t kslots, int64_t N, int64_t H, int64_t W, int64_t K, int64_t max_nch,
             int64_t mode, const OptT& g, at::Tensor& gofull) {
  const DeviceGuard guard(src.device());
  const DType dt = dtype_of(src, "src");
  check_t(w, "w", src);
  check_t(dw, "dw", src);
  check_t(out, "out", src);
  TORCH_CHECK(mode >= 0 && mode <= 2, "expert_conv (cuda): mode must be 0, 1 or 2");
  TORCH_CHECK(mode != 2 || g.has_value(), "expert_conv (cuda): mode 2 needs g");
  if (mode == 2) check_t(gofull, "gofull", src);
  expert_conv::PwdwParams p{};
  p.src = src.data_ptr();
  p.w = w.data_ptr();
  p.dw = dw.data_ptr();
  p.pb = opt_t(pb, "pb", src);
  p.db = opt_t(db, "db", src);
  p.out = out.data_ptr();
  p.g = opt_t(g, "g", src);
  p.gofull = gofull.data_ptr();
  p.E = check_meta(meta, offsets, src);
  p.offsets = offsets.data_ptr<int64_t>();
  p.meta = meta.data_ptr<int64_t>();
  p.perm = opt_i64(perm, "perm", src);
  TORCH_CHECK(kslots >= 1, "expert_conv (cuda): kslots must be >= 1");
  p.kslots = kslots;
  p.N = to_int(N, "N");
  p.H = to_int(H, "H");
  p.W = to_int(W, "W");
  to_int(H * W, "H * W (pixel offsets are 32-bit)");
  p.K = to_int(K, "K");
  p.max_nch = to_int(max_nch, "max_nch");
  p.mode = (int)mode;
  check_cuda(expert_conv::launch_pwdw(dt, p, current_stream(src.device())), "fused pw->dw");
}

void xc_pwdw_bwd(const at::Tensor& src, const at::Tensor& w, const at::Tensor& dw, const OptT& pb,
                 const at::Tensor& go, at::Tensor& gy, at::Tensor& gdw, at::Tensor& gdb, bool has_db,
                 const at::Tensor& offsets, const at::Tensor& meta, const OptT& perm, int64_t kslots, int64_t N,
                 int64_t H, int64_t W, int64_t K, int64_t max_cout) {
  const DeviceGuard guard(src.device());
  const DType dt = dtype_of(src, "src");
  check_t(w, "w", src);
  check_t(dw, "dw", src);
  check_t(go, "go", src);
  check_t(gy, "gy", src);
  check_f32(gdw, "gdw", src);
  if (has_db) check_f32(gdb, "gdb", src);
  expert_conv::PwdwBwdParams p{};
  p.src = src.data_ptr();
  p.w = w.data_ptr();
  p.dw = dw.data_ptr();
  p.pb = opt_t(pb, "pb", src);
  p.go = go.data_ptr();
  p.gy = gy.data_ptr();
  p.gdw = gdw.data_ptr<float>();
  p.gdb = has_db ? gdb.data_ptr<float>() : nullptr;
  p.E = check_meta(meta, offsets, src);
  p.offsets = offsets.data_ptr<int64_t>();
  p.meta = meta.data_ptr<int64_t>();
  p.perm = opt_i64(perm, "perm", src);
  TORCH_CHECK(kslots >= 1, "expert_conv (cuda): kslots must be >= 1");
  p.kslots = kslots;
  p.N = to_int(N, "N");
  p.H = to_int(H, "H");
  p.W = to_int(W, "W");
  to_int(H * W, "H * W (pixel offsets are 32-bit)");
  p.K = to_int(K, "K");
  p.max_cout = to_int(max_cout, "max_cout");
  check_cuda(expert_conv::launch_pwdw_bwd(dt, p, current_stream(src.device())), "fused pw->dw backward");
}

void xc_gemm(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::Tensor& y,
             const at::Tensor& offsets, const at::Tensor& meta, const OptT& perm, int64_t kslots, int64_t N,
             int64_t HW, int64_t max_cout, bool accumulate) {
  const DeviceGuard guard(x.device());
  const DType dt = dtype_of(x, "x");
  check_t(w, "w", x);
  check(y, "y", x);
  const bool y_f32 = y.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  TORCH_CHECK(y_f32 || y.scalar_type() == x.scalar_type(), "expert_conv (cuda): y must be float32 or x's dtype");
  expert_conv::GemmParams p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.b = opt_t(b, "b", x);
  p.y = y.data_ptr();
  p.y_f32 = y_f32;
  p.accumulate = accumulate;
  p.E = check_meta(meta, offsets, x);
  p.offsets = offsets.data_ptr<int64_t>();
  p.meta = meta.data_ptr<int64_t>();
  p.perm = opt_i64(perm, "perm", x);
  TORCH_CHECK(kslots >= 1, "expert_conv (cuda): kslots must be >= 1");
  p.kslots = kslots;
  p.N = to_int(N, "N");
  p.HW = to_int(HW, "HW");
  p.max_cout = to_int(max_cout, "max_cout");
  check_cuda(expert_conv::launch_gemm(dt, p, current_stream(x.device())), "grouped 1x1");
}

void xc_wgrad(const at::Tensor& g, const at::Tensor& x, at::Tensor& o, at::Tensor& bo, bool has_bias,
              const at::Tensor& offsets, const at::Tensor& meta, const OptT& perm, int64_t kslots, int64_t HW,
              int64_t max_cout, int64_t max_cin, int64_t n_split) {
  const DeviceGuard guard(x.device());
  const DType dt = dtype_of(x, "x");
  check(g, "g", x);
  const bool g_f32 = g.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  TORCH_CHECK(g_f32 || g.scalar_type() == x.scalar_type(), "expert_conv (cuda): g must be float32 or x's dtype");
  check_f32(o, "o", x);
  if (has_bias) check_f32(bo, "bo", x);
  expert_conv::WgradParams p{};
  p.g = g.data_ptr();
  p.x = x.data_ptr();
  p.o = o.data_ptr<float>();
  p.bo = has_bias ? bo.data_ptr<float>() : nullptr;
  p.g_f32 = g_f32;
  p.E = check_meta(meta, offsets, x);
  p.offsets = offsets.data_ptr<int64_t>();
  p.meta = meta.data_ptr<int64_t>();
  p.perm = opt_i64(perm, "perm", x);
  TORCH_CHECK(kslots >= 1, "expert_conv (cuda): kslots must be >= 1");
  p.kslots = kslots;
  p.HW = to_int(HW, "HW");
  p.max_cout = to_int(max_cout, "max_cout");
  p.max_cin = to_int(max_cin, "max_cin");
  TORCH_CHECK(n_split >= 1, "expert_conv (cuda): n_split must be >= 1");
  p.n_split = to_int(n_split, "n_split");
  check_cuda(expert_conv::launch_wgrad(dt, p, current_stream(x.device())), "grouped weight grad");
}

void xc_final_fwd(const at::Tensor& xs, const at::Tensor& shared, const at::Tensor& attn,
                  const at::Tensor& w, at::Tensor& out, const at::Tensor& offsets, const at::Tensor& meta,
                  const at::Tensor& perm, int64_t kslots, int64_t N, int64_t C, int64_t HW, bool x_gather,
                  int64_t max_r) {
  const DeviceGuard guard(xs.device());
  const DType dt = dtype_of(xs, "xs");
  for (const at::Tensor* t : {&shared, &attn, &w}) check_t(*t, "expert tensor", xs);
  check_t(out, "out", xs);
  expert_conv::FinalParams p{};
  p.xs = xs.data_ptr();
  p.shared = shared.data_ptr();
  p.attn = attn.data_ptr();
  p.w = w.data_ptr();
  p.out = out.data_ptr();
  p.E = check_meta(meta, offsets, xs);
  p.offsets = offsets.data_ptr<int64_t>();
  p.meta = meta.data_ptr<int64_t>();
  p.perm = i64(perm, "perm", xs);
  TORCH_CHECK(kslots >= 1, "expert_conv (cuda): kslots must be >= 1");
  p.kslots = kslots;
  p.N = to_int(N, "N");
  p.C = to_int(C, "C");
  p.HW = to_int(HW, "HW");
  p.x_gather = x_gather;
  p.max_r = to_int(max_r, "max_r");
  TORCH_CHECK(max_r >= 0, "expert_conv (cuda): max_r must be >= 0");
  check_cuda(expert_conv::launch_final_fwd(dt, p, current_stream(xs.device())), "expert epilogue");
}

void xc_final_bwd(const at::Tensor& g, const at::Tensor& shared, const at::Tensor& attn,
                  const at::Tensor& w, at::Tensor& gt, at::Tensor& gu, at::Tensor& h,
                  const at::Tensor& offsets, const at::Tensor& meta, const at::Tensor& perm, int64_t kslots,
                  int64_t N, int64_t C, int64_t HW, int64_t max_r) {
  const DeviceGuard guard(shared.device());
  const DType dt = dtype_of(shared, "shared");
  check(g, "g", shared);
  const bool g_f32 = g.scalar_type() == at::kFloat && shared.scalar_type() != at::kFloat;
  TORCH_CHECK(g_f32 || g.scalar_type() == shared.scalar_type(), "expert_conv (cuda): g must be float32 or T");
  check_t(attn, "attn", shared);
  check_t(w, "w", shared);
  check_t(gt, "gt", shared);
  check_t(gu, "gu", shared);
  check_t(h, "h", shared);
  expert_conv::FinalBwdParams p{};
  p.g = g.data_ptr();
  p.g_f32 = g_f32;
  p.shared = shared.data_ptr();
  p.attn = attn.data_ptr();
  p.w = w.data_ptr();
  p.gt = gt.data_ptr();
  p.gu = gu.data_ptr();
  p.h = h.data_ptr();
  p.E = check_meta(meta, offsets, shared);
  p.offsets = offsets.data_ptr<int64_t>();
  p.meta = meta.data_ptr<int64_t>();
  p.perm = i64(perm, "perm", shared);
  TORCH_CHECK(kslots >= 1, "expert_conv (cuda): kslots must be >= 1");
  p.kslots = kslots;
  p.N = to_int(N, "N");
  p.C = to_int(C, "C");
  p.HW = to_int(HW, "HW");
  p.max_r = to_int(max_r, "max_r");
  check_cuda(expert_conv::launch_final_bwd(dt, p, current_stream(shared.device())), "expert epilogue backward");
}

void xc_gather_sum(const at::Tensor& src, const at::Tensor& inv, at::Tensor& out, int64_t kslots) {
  const DeviceGuard guard(out.device());
  const DType dt = dtype_of(out, "out");
  check(out, "out", out);
  check_f32(src, "src", out);
  i64(inv, "inv", out);
  TORCH_CHECK(kslots >= 1 && out.dim() >= 1, "expert_conv (cuda): bad gather_sum arguments");
  const int64_t B = out.size(0), L = out.numel() / std::max<int64_t>(B, 1);
  TORCH_CHECK(src.numel() == B * kslots * L && inv.numel() == B * kslots,
              "expert_conv (cuda): gather_sum src must be (B*k, ...) and inv (B*k,)");
  check_cuda(expert_conv::launch_gather_sum(dt, src.data_ptr<float>(), inv.data_ptr<int64_t>(), out.data_ptr(), B, L,
                                            kslots, current_stream(out.device())),
             "gather-sum");
}

}  // namespace

void register_expert_conv(torch::Library& m) {
  m.def("xc_pwdw(Tensor src, Tensor w, Tensor dw, Tensor? pb, Tensor? db, Tensor(a!) out, Tensor offsets, "
        "Tensor meta, Tensor? perm, int kslots, int N, int H, int W, int K, int max_nch, int mode, Tensor? g, "
        "Tensor(b!) gofull) -> ()");
  m.def("xc_pwdw_bwd(Tensor src, Tensor w, Tensor dw, Tensor? pb, Tensor go, Tensor(a!) gy, Tensor(b!) gdw, "
        "Tensor(c!) gdb, bool has_db, Tensor offsets, Tensor meta, Tensor? perm, int kslots, int N, int H, int W, "
        "int K, int max_cout) -> ()");
  m.def("xc_gemm(Tensor x, Tensor w, Tensor? b, Tensor(a!) y, Tensor offsets, Tensor meta, Tensor? perm, "
        "int kslots, int N, int HW, int max_cout, bool accumulate) -> ()");
  m.def("xc_wgrad(Tensor g, Tensor x, Tensor(a!) o, Tensor(b!) bo, bool has_bias, Tensor offsets, Tensor meta, "
        "Tensor? perm, int kslots, int HW, int max_cout, int max_cin, int n_split) -> ()");
  m.def("xc_final_fwd(Tensor xs, Tensor shared, Tensor attn, Tensor w, Tensor(a!) out, Tensor offsets, "
        "Tensor meta, Tensor perm, int kslots, int N, int C, int HW, bool x_gather, int max_r) -> ()");
  m.def("xc_final_bwd(Tensor g, Tensor shared, Tensor attn, Tensor w, Tensor(a!) gt, Tensor(b!) gu, "
        "Tensor(c!) h, Tensor offsets, Tensor meta, Tensor perm, int kslots, int N, int C, int HW, int max_r) -> ()");
  m.def("xc_gather_sum(Tensor src, Tensor inv, Tensor(a!) out, int kslots) -> ()");
  m.impl("xc_pwdw", kKernelDevice, &xc_pwdw);
  m.impl("xc_pwdw_bwd", kKernelDevice, &xc_pwdw_bwd);
  m.impl("xc_gemm", kKernelDevice, &xc_gemm);
  m.impl("xc_wgrad", kKernelDevice, &xc_wgrad);
  m.impl("xc_final_fwd", kKernelDevice, &xc_final_fwd);
  m.impl("xc_final_bwd", kKernelDevice, &xc_final_bwd);
  m.impl("xc_gather_sum", kKernelDevice, &xc_gather_sum);
}

}  // namespace moce
