// Torch-facing wrappers of the routing kernels: input checks, scratch allocation, launch on the current
// stream. Outputs are allocated by the Python side (moce_kernels/cuda/routing.py, with new_output so tests
// can poison them) and passed in; every op returns nothing. Small router tensors arrive as fp32.
#include "routing/ops.h"

#include "common/torch_device.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "routing/kernels.h"

namespace moce {
namespace {

using routing::DType;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "moce_C routing: ", what, " failed: ", cudaGetErrorString(err));
}

DType big_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "moe routing (cuda): ", name, " must be float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return DType::kFloat32;
}

void check_dev(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(on_kernel_device(t), "moe routing (cuda): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "moe routing (cuda): ", name, " is on ", t.device(), " but expected ",
              like.device());
  TORCH_CHECK(t.is_contiguous(), "moe routing (cuda): ", name, " must be contiguous");
}

void check_f32(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t numel) {
  check_dev(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "moe routing (cuda): ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "moe routing (cuda): ", name, " must have ", numel, " elements, got ", t.numel());
}

void check_i64(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t numel) {
  check_dev(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kLong, "moe routing (cuda): ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "moe routing (cuda): ", name, " must have ", numel, " elements, got ", t.numel());
}

// Checks the router inputs, runs the pooling pass and fills the head parameters (scratch kept alive by
// the returned tensors).
struct RouterSetup {
  routing::RouteParams p;
  at::Tensor part, scratch;
};

RouterSetup setup_router(const at::Tensor& x, const at::Tensor& fe, const at::Tensor& gw,
                         const at::Tensor& fw, const at::Tensor& cplx, const at::Tensor& noise, int64_t k,
                         double noise_std, bool compute_loss, bool use_complexity, cudaStream_t stream) {
  TORCH_CHECK(x.dim() == 4, "moe routing (cuda): x must be (B, C, H, W)");
  check_dev(x, "x", x);
  const DType dt = big_dtype(x, "x");
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(gw.dim() == 2 && fe.dim() == 2, "moe routing (cuda): gate_weight and freq_emb must be 2-D");
  const int64_t E = gw.size(0), F = fe.size(1);
  TORCH_CHECK(E >= 1 && E <= routing::kMaxExperts, "moe routing (cuda): 1 <= E <= ", routing::kMaxExperts,
              " experts supported, got ", E);
  TORCH_CHECK(k >= 1 && k <= E, "moe routing (cuda): k must be in [1, ", E, "], got ", k);
  TORCH_CHECK(B >= 1 && HW >= 1, "moe routing (cuda): empty input");
  check_f32(fe, "freq_emb", x, B * F);
  check_f32(gw, "gate_weight", x, E * C);
  check_f32(fw, "freq_weight", x, E * F);
  check_f32(cplx, "complexity", x, E);
  check_f32(noise, "noise", x, B * E);
  RouterSetup s;
  const int split = routing::pool_split(B * C, HW);
  s.part = at::empty({B * C, split}, x.options().dtype(at::kFloat));
  s.scratch = at::empty({routing::route_scratch_doubles(B, C, E)}, x.options().dtype(at::kDouble));
  check_cuda(routing::launch_pool_partial(x.data_ptr(), dt, B * C, HW, split, s.part.data_ptr<float>(), stream),
             "pool_partial launch");
  s.p = routing::RouteParams{s.part.data_ptr<float>(), fe.data_ptr<float>(), gw.data_ptr<float>(),
                             fw.data_ptr<float>(), cplx.data_ptr<float>(), noise.data_ptr<float>(),
                             s.scratch.data_ptr<double>(), B, C, F, E, split,
                             static_cast<float>(1.0 / static_cast<double>(HW)), static_cast<float>(noise_std),
                             static_cast<int>(k), compute_loss, use_complexity};
  return s;
}

void route_forward(const at::Tensor& x, const at::Tensor& fe, const at::Tensor& gw, const at::Tensor& fw,
                   const at::Tensor& cplx, const at::Tensor& noise, int64_t k, double noise_std,
                   bool compute_loss, bool use_complexity, at::Tensor& gates, at::Tensor& indices,
                   at::Tensor& logits, at::Tensor& loss) {
  const DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream(x.device());
  RouterSetup s = setup_router(x, fe, gw, fw, cplx, noise, k, noise_std, compute_loss, use_complexity, stream);
  const int64_t B = s.p.B, E = s.p.E;
  check_f32(gates, "gates", x, B * k);
  check_i64(indices, "indices", x, B * k);
  check_f32(logits, "logits", x, B * E);
  check_f32(loss, "loss", x, 1);
  check_cuda(routing::launch_route_head(s.p, gates.data_ptr<float>(), indices.data_ptr<int64_t>(),
                                        logits.data_ptr<float>(), loss.data_ptr<float>(), stream),
             "route_head launch");
}

void route_backward(const at::Tensor& grad_gates, const at::Tensor& grad_logits, const at::Tensor& grad_loss,
                    const at::Tensor& x, const at::Tensor& fe, const at::Tensor& gw, const at::Tensor& fw,
                    const at::Tensor& cplx, const at::Tensor& noise, int64_t k, double noise_std,
                    bool compute_loss, bool use_complexity, at::Tensor& grad_x, at::Tensor& grad_fe,
                    at::Tensor& grad_gw, at::Tensor& grad_fw) {
  const DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream(x.device());
  RouterSetup s = setup_router(x, fe, gw, fw, cplx, noise, k, noise_std, compute_loss, use_complexity, stream);
  const int64_t B = s.p.B, C = s.p.C, F = s.p.F, E = s.p.E, HW = x.size(2) * x.size(3);
  check_f32(grad_gates, "grad_gates", x, B * k);
  check_f32(grad_logits, "grad_logits", x, B * E);
  check_f32(grad_loss, "grad_loss", x, 1);
  check_f32(grad_fe, "grad_freq_emb", x, B * F);
  check_f32(grad_gw, "grad_gate_weight", x, E * C);
  check_f32(grad_fw, "grad_freq_weight", x, E * F);
  check_dev(grad_x, "grad_x", x);
  TORCH_CHECK(grad_x.sizes() == x.sizes() && grad_x.scalar_type() == x.scalar_type(),
              "moe routing (cuda): grad_x must match x");
  at::Tensor gpool = at::empty({B, C}, x.options().dtype(at::kFloat));
  check_cuda(routing::launch_route_head_backward(s.p, grad_gates.data_ptr<float>(), grad_logits.data_ptr<float>(),
                                                 grad_loss.data_ptr<float>(), grad_fe.data_ptr<float>(),
                                                 grad_gw.data_ptr<float>(), grad_fw.data_ptr<float>(),
                                                 gpool.data_ptr<float>(), stream),
             "route_head_backward launch");
  check_cuda(routing::launch_broadcast_rows(gpool.data_ptr<float>(), grad_x.data_ptr(), big_dtype(x, "x"), B * C, HW,
                                            stream),
             "broadcast_rows launch");
}

void dispatch(const at::Tensor& indices, int64_t num_experts, at::Tensor& counts, at::Tensor& offsets,
              at::Tensor& perm) {
  const DeviceGuard guard(indices.device());
  const cudaStream_t stream = current_stream(indices.device());
  check_i64(indices, "indices", indices, indices.numel());
  TORCH_CHECK(num_experts >= 1 && num_experts <= routing::kMaxExperts, "moe_dispatch (cuda): 1 <= num_experts <= ",
              routing::kMaxExperts, ", got ", num_experts);
  check_i64(counts, "counts", indices, num_experts);
  check_i64(offsets, "offsets", indices, num_experts + 1);
  check_i64(perm, "perm", indices, indices.numel());
  check_cuda(routing::launch_dispatch(indices.data_ptr<int64_t>(), indices.numel(), static_cast<int>(num_experts),
                                      counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                      perm.data_ptr<int64_t>(), stream),
             "dispatch launch");
}

void check_combine(const at::Tensor& eo, const at::Tensor& gates, const at::Tensor& perm) {
  check_dev(eo, "expert_out", eo);
  TORCH_CHECK(gates.dim() == 2, "moe_combine (cuda): gates must be (B, k)");
  const int64_t B = gates.size(0), k = gates.size(1);
  TORCH_CHECK(k >= 1 && k <= routing::kMaxTopK, "moe_combine (cuda): 1 <= k <= ", routing::kMaxTopK);
  TORCH_CHECK(eo.dim() >= 1 && eo.size(0) == B * k, "moe_combine (cuda): expert_out must have B*k rows");
  check_f32(gates, "gates", eo, B * k);
  check_i64(perm, "perm", eo, B * k);
}

void combine(const at::Tensor& eo, const at::Tensor& gates, const at::Tensor& perm, at::Tensor& out) {
  const DeviceGuard guard(eo.device());
  const cudaStream_t stream = current_stream(eo.device());
  check_combine(eo, gates, perm);
  const int64_t B = gates.size(0), k = gates.size(1);
  const int64_t N = B * k > 0 ? eo.numel() / (B * k) : 0;
  check_dev(out, "out", eo);
  TORCH_CHECK(out.numel() == B * N && out.scalar_type() == eo.scalar_type(), "moe_combine (cuda): bad out");
  check_cuda(routing::launch_combine(eo.data_ptr(), gates.data_ptr<float>(), perm.data_ptr<int64_t>(), out.data_ptr(),
                                     big_dtype(eo, "expert_out"), B, static_cast<int>(k), N, stream),
             "combine launch");
}

void combine_backward(const at::Tensor& grad, const at::Tensor& eo, const at::Tensor& gates,
                      const at::Tensor& perm, at::Tensor& grad_eo, at::Tensor& grad_gates) {
  const DeviceGuard guard(eo.device());
  const cudaStream_t stream = current_stream(eo.device());
  check_combine(eo, gates, perm);
  const int64_t B = gates.size(0), k = gates.size(1);
  const int64_t N = B * k > 0 ? eo.numel() / (B * k) : 0;
  check_dev(grad, "grad", eo);
  TORCH_CHECK(grad.numel() == B * N && grad.scalar_type() == eo.scalar_type(), "moe_combine_backward (cuda): bad grad");
  check_dev(grad_eo, "grad_expert_out", eo);
  TORCH_CHECK(grad_eo.sizes() == eo.sizes() && grad_eo.scalar_type() == eo.scalar_type(),
              "moe_combine_backward (cuda): grad_expert_out must match expert_out");
  check_f32(grad_gates, "grad_gates", eo, B * k);
  if (B * k == 0 || N == 0) return;
  at::Tensor part =
      at::empty({routing::combine_backward_scratch_floats(B, static_cast<int>(k), N)}, eo.options().dtype(at::kFloat));
  check_cuda(routing::launch_combine_backward(grad.data_ptr(), eo.data_ptr(), gates.data_ptr<float>(),
                                              perm.data_ptr<int64_t>(), grad_eo.data_ptr(),
                                              grad_gates.data_ptr<float>(), part.data_ptr<float>(),
                                              big_dtype(eo, "expert_out"), B, static_cast<int>(k), N, stream),
             "combine_backward launch");
}

}  // namespace

void register_routing(torch::Library& m) {
  m.def("moe_route_forward(Tensor x, Tensor freq_emb, Tensor gate_weight, Tensor freq_weight, Tensor complexity, "
        "Tensor noise, int k, float noise_std, bool compute_loss, bool use_complexity, Tensor(a!) gates, "
        "Tensor(b!) indices, Tensor(c!) logits, Tensor(d!) loss) -> ()");
  m.def("moe_route_backward(Tensor grad_gates, Tensor grad_logits, Tensor grad_loss, Tensor x, Tensor freq_emb, "
        "Tensor gate_weight, Tensor freq_weight, Tensor complexity, Tensor noise, int k, float noise_std, "
        "bool compute_loss, bool use_complexity, Tensor(a!) grad_x, Tensor(b!) grad_freq_emb, "
        "Tensor(c!) grad_gate_weight, Tensor(d!) grad_freq_weight) -> ()");
  m.def("moe_dispatch(Tensor indices, int num_experts, Tensor(a!) counts, Tensor(b!) offsets, Tensor(c!) perm) -> ()");
  m.def("moe_combine(Tensor expert_out, Tensor gates, Tensor perm, Tensor(a!) out) -> ()");
  m.def("moe_combine_backward(Tensor grad, Tensor expert_out, Tensor gates, Tensor perm, Tensor(a!) grad_expert_out, "
        "Tensor(b!) grad_gates) -> ()");
  m.impl("moe_route_forward", kKernelDevice, &route_forward);
  m.impl("moe_route_backward", kKernelDevice, &route_backward);
  m.impl("moe_dispatch", kKernelDevice, &dispatch);
  m.impl("moe_combine", kKernelDevice, &combine);
  m.impl("moe_combine_backward", kKernelDevice, &combine_backward);
}

}  // namespace moce
