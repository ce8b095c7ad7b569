// Torch-facing wrappers of the grouped-convolution kernels: input checks, launch on the current stream.
// Outputs and scratch are allocated by the Python side (moce_kernels/cuda/expert_conv.py, through the
// shared driver moce_kernels/ops/grouped_conv.py) and passed in; every op returns nothing.
// Ops (namespace moce_C): grouped_pwdw, grouped_pwdw_backward, grouped_gemm, grouped_wgrad.
#include "grouped_conv/ops.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "common/torch_checks.h"
#include "common/torch_device.h"
#include "grouped_conv/kernels.h"

namespace moce {
namespace {

using OptT = std::optional<at::Tensor>;

constexpr Checks kCheck{"grouped_conv (cuda)"};

// A tensor of the activation dtype (like's).
void check_t(const at::Tensor& t, const char* name, const at::Tensor& like) {
  kCheck.typed(t, name, like, like.scalar_type());
}

const void* opt_t(const OptT& t, const char* name, const at::Tensor& like) {
  if (!t.has_value()) return nullptr;
  check_t(*t, name, like);
  return t->data_ptr();
}

// A buffer that is fp32 or of the activation dtype: true for fp32 (when the activations are not).
bool f32_or_t(const at::Tensor& t, const char* name, const at::Tensor& like) {
  kCheck.device(t, name, like);
  const bool f32 = t.scalar_type() == at::kFloat && like.scalar_type() != at::kFloat;
  TORCH_CHECK(f32 || t.scalar_type() == like.scalar_type(), kCheck.who, ": ", name,
              " must be float32 or the activations' dtype");
  return f32;
}

// The fused pw->dw's source and weights (w, dw of src's dtype) and image size, into p.
template <typename Params>
void set_pwdw_inputs(Params& p, const at::Tensor& src, const at::Tensor& w, const at::Tensor& dw, const OptT& pb,
                     int64_t N, int64_t H, int64_t W, int64_t K) {
  check_t(w, "w", src);
  check_t(dw, "dw", src);
  p.src = src.data_ptr();
  p.w = w.data_ptr();
  p.dw = dw.data_ptr();
  p.pb = opt_t(pb, "pb", src);
  p.N = kCheck.to_int(N, "N");
  p.H = kCheck.to_int(H, "H");
  p.W = kCheck.to_int(W, "W");
  kCheck.to_int(H * W, "H * W (pixel offsets are 32-bit)");
  p.K = kCheck.to_int(K, "K");
}

void grouped_pwdw(const at::Tensor& src, const at::Tensor& w, const at::Tensor& dw, const OptT& pb, const OptT& db,
                  at::Tensor& out, const at::Tensor& offsets, const at::Tensor& meta, const OptT& perm, int64_t kslots,
                  int64_t N, int64_t H, int64_t W, int64_t K, int64_t max_nch, int64_t mode, const OptT& g,
                  at::Tensor& gofull) {
  const DeviceGuard guard(src.device());
  const DType dt = kCheck.dtype(src, "src");
  check_t(out, "out", src);
  TORCH_CHECK(mode >= 0 && mode <= 2, kCheck.who, ": mode must be 0, 1 or 2");
  TORCH_CHECK(mode != 2 || g.has_value(), kCheck.who, ": mode 2 needs g");
  if (mode == 2) check_t(gofull, "gofull", src);
  grouped_conv::PwdwParams p{kCheck.group(offsets, meta, perm, kslots, src)};
  set_pwdw_inputs(p, src, w, dw, pb, N, H, W, K);
  p.db = opt_t(db, "db", src);
  p.out = out.data_ptr();
  p.g = opt_t(g, "g", src);
  p.gofull = gofull.data_ptr();
  p.max_nch = kCheck.to_int(max_nch, "max_nch");
  p.mode = (int)mode;
  kCheck.launch(grouped_conv::launch_pwdw(dt, p, current_stream(src.device())), "fused pw->dw");
}

void grouped_pwdw_backward(const at::Tensor& src, const at::Tensor& w, const at::Tensor& dw, const OptT& pb,
                           const at::Tensor& go, at::Tensor& gy, at::Tensor& gdw, at::Tensor& gdb, bool has_db,
                           const at::Tensor& offsets, const at::Tensor& meta, const OptT& perm, int64_t kslots,
                           int64_t N, int64_t H, int64_t W, int64_t K, int64_t max_cout) {
  const DeviceGuard guard(src.device());
  const DType dt = kCheck.dtype(src, "src");
  check_t(go, "go", src);
  check_t(gy, "gy", src);
  kCheck.typed(gdw, "gdw", src, at::kFloat);
  if (has_db) kCheck.typed(gdb, "gdb", src, at::kFloat);
  grouped_conv::PwdwBwdParams p{kCheck.group(offsets, meta, perm, kslots, src)};
  set_pwdw_inputs(p, src, w, dw, pb, N, H, W, K);
  p.go = go.data_ptr();
  p.gy = gy.data_ptr();
  p.gdw = gdw.data_ptr<float>();
  p.gdb = has_db ? gdb.data_ptr<float>() : nullptr;
  p.max_cout = kCheck.to_int(max_cout, "max_cout");
  kCheck.launch(grouped_conv::launch_pwdw_bwd(dt, p, current_stream(src.device())), "fused pw->dw backward");
}

void grouped_gemm(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::Tensor& y, const at::Tensor& offsets,
                  const at::Tensor& meta, const OptT& perm, int64_t kslots, int64_t N, int64_t HW, int64_t max_cout,
                  bool accumulate) {
  const DeviceGuard guard(x.device());
  const DType dt = kCheck.dtype(x, "x");
  check_t(w, "w", x);
  grouped_conv::GemmParams p{kCheck.group(offsets, meta, perm, kslots, x)};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.b = opt_t(b, "b", x);
  p.y = y.data_ptr();
  p.y_f32 = f32_or_t(y, "y", x);
  p.accumulate = accumulate;
  p.N = kCheck.to_int(N, "N");
  p.HW = kCheck.to_int(HW, "HW");
  p.max_cout = kCheck.to_int(max_cout, "max_cout");
  kCheck.launch(grouped_conv::launch_gemm(dt, p, current_stream(x.device())), "grouped 1x1");
}

void grouped_wgrad(const at::Tensor& g, const at::Tensor& x, at::Tensor& o, at::Tensor& bo, bool has_bias,
                   const at::Tensor& offsets, const at::Tensor& meta, const OptT& perm, int64_t kslots, int64_t HW,
                   int64_t max_cout, int64_t max_cin, int64_t n_split) {
  const DeviceGuard guard(x.device());
  const DType dt = kCheck.dtype(x, "x");
  kCheck.typed(o, "o", x, at::kFloat);
  if (has_bias) kCheck.typed(bo, "bo", x, at::kFloat);
  TORCH_CHECK(n_split >= 1, kCheck.who, ": n_split must be >= 1");
  grouped_conv::WgradParams p{kCheck.group(offsets, meta, perm, kslots, x)};
  p.g = g.data_ptr();
  p.x = x.data_ptr();
  p.o = o.data_ptr<float>();
  p.bo = has_bias ? bo.data_ptr<float>() : nullptr;
  p.g_f32 = f32_or_t(g, "g", x);
  p.HW = kCheck.to_int(HW, "HW");
  p.max_cout = kCheck.to_int(max_cout, "max_cout");
  p.max_cin = kCheck.to_int(max_cin, "max_cin");
  p.n_split = kCheck.to_int(n_split, "n_split");
  kCheck.launch(grouped_conv::launch_wgrad(dt, p, current_stream(x.device())), "grouped weight grad");
}

}  // namespace

void register_grouped_conv(torch::Library& m) {
  define_op(m,
            "grouped_pwdw(Tensor src, Tensor w, Tensor dw, Tensor? pb, Tensor? db, Tensor(a!) out, Tensor offsets, "
            "Tensor meta, Tensor? perm, int kslots, int N, int H, int W, int K, int max_nch, int mode, Tensor? g, "
            "Tensor(b!) gofull) -> ()",
            &grouped_pwdw);
  define_op(m,
            "grouped_pwdw_backward(Tensor src, Tensor w, Tensor dw, Tensor? pb, Tensor go, Tensor(a!) gy, "
            "Tensor(b!) gdw, Tensor(c!) gdb, bool has_db, Tensor offsets, Tensor meta, Tensor? perm, int kslots, "
            "int N, int H, int W, int K, int max_cout) -> ()",
            &grouped_pwdw_backward);
  define_op(m,
            "grouped_gemm(Tensor x, Tensor w, Tensor? b, Tensor(a!) y, Tensor offsets, Tensor meta, Tensor? perm, "
            "int kslots, int N, int HW, int max_cout, bool accumulate) -> ()",
            &grouped_gemm);
  define_op(m,
            "grouped_wgrad(Tensor g, Tensor x, Tensor(a!) o, Tensor(b!) bo, bool has_bias, Tensor offsets, "
            "Tensor meta, Tensor? perm, int kslots, int HW, int max_cout, int max_cin, int n_split) -> ()",
            &grouped_wgrad);
}

}  // namespace moce
