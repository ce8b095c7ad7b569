// Torch-facing wrappers of the window_attention kernels: input checks, allocation, launch on the current stream.
#include "window_attention/ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "common/torch_checks.h"
#include "common/torch_device.h"
#include "window_attention/kernels.h"

namespace moce {
namespace {

constexpr Checks kCheck{"window_fft_attention (cuda)"};

// t is on q's device, contiguous, of q's shape and dtype.
void check_like(const char* name, const at::Tensor& t, const at::Tensor& q) {
  kCheck.typed(t, name, q, q.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), kCheck.who, ": ", name, " has shape ", t.sizes(), " but q has shape ",
              q.sizes());
}

// Checks q (and the tensors that must match it), the norm parameters and rows; returns the shape.
wfa::Shape check_inputs(const at::Tensor& q, std::initializer_list<std::pair<const char*, const at::Tensor*>> like,
                        int64_t window_size, const at::Tensor& w, const at::Tensor& b, double eps,
                        const at::Tensor* rows) {
  kCheck.device(q, "q", q);
  TORCH_CHECK(q.dim() == 4, kCheck.who, ": q must be (N, C, H, W), got ", q.sizes());
  kCheck.dtype(q, "q");
  for (const auto& [name, t] : like) check_like(name, *t, q);
  for (const auto& [name, t] : {std::make_pair("norm_weight", &w), std::make_pair("norm_bias", &b)}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == q.size(1), kCheck.who, ": ", name,
                " must have shape (C,) = (", q.size(1), ",), got ", t->sizes());
    TORCH_CHECK(t->device() == q.device(), kCheck.who, ": ", name, " is on ", t->device(),
                " but q is on ", q.device());
    TORCH_CHECK(t->is_floating_point(), kCheck.who, ": ", name, " must be floating point");
  }
  if (rows != nullptr) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->numel() == 2 && rows->device() == q.device(),
                kCheck.who, ": rows must be an int64 tensor of 2 elements on q's device");
  }
  wfa::Shape s{q.size(0), q.size(1), q.size(2), q.size(3), static_cast<int>(window_size), static_cast<float>(eps)};
  TORCH_CHECK(window_size == 4 || window_size == 8 || window_size == 16 || window_size == 32,
              kCheck.who, ": window_size must be one of 4, 8, 16, 32, got ", window_size);
  if (const char* msg = wfa::check_shape(s)) TORCH_CHECK(false, kCheck.who, ": ", msg);
  return s;
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The kernels' inputs (wf, bf: the norm parameters as fp32; rows: undefined for all rows).
wfa::Inputs inputs(const wfa::Shape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& wf, const at::Tensor& bf, const at::Tensor& rows) {
  return wfa::Inputs{s, kCheck.dtype(q, "q"), q.data_ptr(), k.data_ptr(), v.data_ptr(), wf.data_ptr<float>(),
                     bf.data_ptr<float>(), rows.defined() ? rows.data_ptr<int64_t>() : nullptr};
}

void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_size,
                  const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor& out, const at::Tensor* rows) {
  const wfa::Shape s = check_inputs(q, {{"k", &k}, {"v", &v}, {"out", &out}}, window_size, w, b, eps, rows);
  const DeviceGuard guard(q.device());
  const at::Tensor wf = as_float(w), bf = as_float(b);
  const at::Tensor rows_c = rows != nullptr ? rows->contiguous() : at::Tensor();
  const wfa::FwdArgs a{inputs(s, q, k, v, wf, bf, rows_c), out.data_ptr()};
  kCheck.launch(wfa::forward(a, current_stream(q.device())), "forward launch");
}

std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, int64_t window_size, const at::Tensor& w,
                                                 const at::Tensor& b, double eps, at::Tensor& gq, at::Tensor& gk,
                                                 at::Tensor& gv, const at::Tensor* rows) {
  const wfa::Shape s = check_inputs(
      q, {{"grad", &grad}, {"k", &k}, {"v", &v}, {"grad_q", &gq}, {"grad_k", &gk}, {"grad_v", &gv}},
      window_size, w, b, eps, rows);
  const DeviceGuard guard(q.device());
  const at::Tensor wf = as_float(w), bf = as_float(b);
  const at::Tensor rows_c = rows != nullptr ? rows->contiguous() : at::Tensor();
  const auto fopt = q.options().dtype(at::kFloat);
  at::Tensor ws = at::empty({wfa::backward_workspace_floats(s)}, fopt);
  at::Tensor gw = at::empty({s.C}, fopt), gb = at::empty({s.C}, fopt);
  const wfa::BwdArgs a{inputs(s, q, k, v, wf, bf, rows_c), grad.data_ptr(), gq.data_ptr(), gk.data_ptr(),
                       gv.data_ptr(), ws.data_ptr<float>(), gw.data_ptr<float>(), gb.data_ptr<float>()};
  kCheck.launch(wfa::backward(a, current_stream(q.device())), "backward launch");
  return {gw, gb};
}

// ---- registered ops ----

at::Tensor window_fft_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_size,
                                const at::Tensor& w, const at::Tensor& b, double eps) {
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  forward_impl(q, k, v, window_size, w, b, eps, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_fft_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_size,
    const at::Tensor& w, const at::Tensor& b, double eps) {
  at::Tensor gq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor gk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor gv = at::empty_like(v, at::MemoryFormat::Contiguous);
  auto [gw, gb] = backward_impl(grad, q, k, v, window_size, w, b, eps, gq, gk, gv, nullptr);
  return {gq, gk, gv, gw.to(w.scalar_type()), gb.to(b.scalar_type())};
}

void window_fft_attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_size,
                               const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor out,
                               const at::Tensor& rows) {
  forward_impl(q, k, v, window_size, w, b, eps, out, &rows);
}

std::tuple<at::Tensor, at::Tensor> window_fft_attention_rows_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_size,
    const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor grad_q, at::Tensor grad_k, at::Tensor grad_v,
    const at::Tensor& rows) {
  return backward_impl(grad, q, k, v, window_size, w, b, eps, grad_q, grad_k, grad_v, &rows);
}

}  // namespace

void register_window_attention(torch::Library& m) {
  define_op(m,
            "window_fft_attention(Tensor q, Tensor k, Tensor v, int window_size, Tensor norm_weight, "
            "Tensor norm_bias, float eps) -> Tensor",
            &window_fft_attention);
  define_op(m,
            "window_fft_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, int window_size, "
            "Tensor norm_weight, Tensor norm_bias, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
            &window_fft_attention_backward);
  define_op(m,
            "window_fft_attention_rows(Tensor q, Tensor k, Tensor v, int window_size, Tensor norm_weight, "
            "Tensor norm_bias, float eps, Tensor(a!) out, Tensor rows) -> ()",
            &window_fft_attention_rows);
  define_op(m,
            "window_fft_attention_rows_backward(Tensor grad, Tensor q, Tensor k, Tensor v, int window_size, "
            "Tensor norm_weight, Tensor norm_bias, float eps, Tensor(a!) grad_q, Tensor(b!) grad_k, "
            "Tensor(c!) grad_v, Tensor rows) -> (Tensor, Tensor)",
            &window_fft_attention_rows_backward);
}

}  // namespace moce
