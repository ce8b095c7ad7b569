// Torch-facing wrappers of the routing kernels: input checks, scratch allocation, launch on the current
// stream. Outputs are allocated by the Python side (moce_kernels/cuda/routing.py, with new_output so tests
// can poison them) and passed in; every op returns nothing. Small router tensors arrive as fp32.
#include "routing/ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/torch_checks.h"
#include "common/torch_device.h"
#include "routing/kernels.h"

namespace moce {
namespace {

constexpr Checks kCheck{"moe routing (cuda)"};

// The router head's per-image fp32 tensors: gates (B, k), logits (B, E) and the loss (1): its outputs
// in the forward, their gradients ("grad_" names) in the backward.
struct HeadTensors {
  const at::Tensor& gates;
  const at::Tensor& logits;
  const at::Tensor& loss;
  bool grads;
};

// One router call: the device guard and stream of x, the checked inputs and head tensors, the pooling
// pass (run by the constructor) and the head's parameters (its scratch kept alive here).
struct RouterCall {
  const DeviceGuard guard;
  const cudaStream_t stream;
  at::Tensor part, scratch;
  routing::RouteParams p;

  RouterCall(const at::Tensor& x, const at::Tensor& fe, const at::Tensor& gw, const at::Tensor& fw,
             const at::Tensor& cplx, const at::Tensor& noise, int64_t k, double noise_std, bool compute_loss,
             bool use_complexity, const HeadTensors& head)
      : guard(x.device()), stream(current_stream(x.device())) {
    TORCH_CHECK(x.dim() == 4, kCheck.who, ": x must be (B, C, H, W)");
    kCheck.device(x, "x", x);
    const DType dt = kCheck.dtype(x, "x");
    const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
    TORCH_CHECK(gw.dim() == 2 && fe.dim() == 2, kCheck.who, ": gate_weight and freq_emb must be 2-D");
    const int64_t E = gw.size(0), F = fe.size(1);
    TORCH_CHECK(E >= 1 && E <= routing::kMaxExperts, kCheck.who, ": 1 <= E <= ", routing::kMaxExperts,
                " experts supported, got ", E);
    TORCH_CHECK(k >= 1 && k <= E, kCheck.who, ": k must be in [1, ", E, "], got ", k);
    TORCH_CHECK(B >= 1 && HW >= 1, kCheck.who, ": empty input");
    kCheck.sized(fe, "freq_emb", x, at::kFloat, B * F);
    kCheck.sized(gw, "gate_weight", x, at::kFloat, E * C);
    kCheck.sized(fw, "freq_weight", x, at::kFloat, E * F);
    kCheck.sized(cplx, "complexity", x, at::kFloat, E);
    kCheck.sized(noise, "noise", x, at::kFloat, B * E);
    kCheck.sized(head.gates, head.grads ? "grad_gates" : "gates", x, at::kFloat, B * k);
    kCheck.sized(head.logits, head.grads ? "grad_logits" : "logits", x, at::kFloat, B * E);
    kCheck.sized(head.loss, head.grads ? "grad_loss" : "loss", x, at::kFloat, 1);
    const int split = routing::pool_split(B * C, HW);
    part = at::empty({B * C, split}, x.options().dtype(at::kFloat));
    scratch = at::empty({routing::route_scratch_doubles(B, C, E)}, x.options().dtype(at::kDouble));
    kCheck.launch(routing::launch_pool_partial(x.data_ptr(), dt, B * C, HW, split, part.data_ptr<float>(), stream),
                  "pool_partial launch");
    p = routing::RouteParams{part.data_ptr<float>(), fe.data_ptr<float>(), gw.data_ptr<float>(),
                             fw.data_ptr<float>(), cplx.data_ptr<float>(), noise.data_ptr<float>(),
                             scratch.data_ptr<double>(), B, C, F, E, split,
                             static_cast<float>(1.0 / static_cast<double>(HW)), static_cast<float>(noise_std),
                             static_cast<int>(k), compute_loss, use_complexity};
  }
};

void route_forward(const at::Tensor& x, const at::Tensor& fe, const at::Tensor& gw, const at::Tensor& fw,
                   const at::Tensor& cplx, const at::Tensor& noise, int64_t k, double noise_std,
                   bool compute_loss, bool use_complexity, at::Tensor& gates, at::Tensor& indices,
                   at::Tensor& logits, at::Tensor& loss) {
  const RouterCall r(x, fe, gw, fw, cplx, noise, k, noise_std, compute_loss, use_complexity,
                     {gates, logits, loss, false});
  kCheck.sized(indices, "indices", x, at::kLong, r.p.B * k);
  kCheck.launch(routing::launch_route_head(r.p, gates.data_ptr<float>(), indices.data_ptr<int64_t>(),
                                           logits.data_ptr<float>(), loss.data_ptr<float>(), r.stream),
                "route_head launch");
}

void route_backward(const at::Tensor& grad_gates, const at::Tensor& grad_logits, const at::Tensor& grad_loss,
                    const at::Tensor& x, const at::Tensor& fe, const at::Tensor& gw, const at::Tensor& fw,
                    const at::Tensor& cplx, const at::Tensor& noise, int64_t k, double noise_std,
                    bool compute_loss, bool use_complexity, at::Tensor& grad_x, at::Tensor& grad_fe,
                    at::Tensor& grad_gw, at::Tensor& grad_fw) {
  const RouterCall r(x, fe, gw, fw, cplx, noise, k, noise_std, compute_loss, use_complexity,
                     {grad_gates, grad_logits, grad_loss, true});
  const int64_t B = r.p.B, C = r.p.C, F = r.p.F, E = r.p.E, HW = x.size(2) * x.size(3);
  kCheck.sized(grad_fe, "grad_freq_emb", x, at::kFloat, B * F);
  kCheck.sized(grad_gw, "grad_gate_weight", x, at::kFloat, E * C);
  kCheck.sized(grad_fw, "grad_freq_weight", x, at::kFloat, E * F);
  kCheck.device(grad_x, "grad_x", x);
  TORCH_CHECK(grad_x.sizes() == x.sizes() && grad_x.scalar_type() == x.scalar_type(),
              kCheck.who, ": grad_x must match x");
  at::Tensor gpool = at::empty({B, C}, x.options().dtype(at::kFloat));
  kCheck.launch(routing::launch_route_head_backward(r.p, grad_gates.data_ptr<float>(), grad_logits.data_ptr<float>(),
                                                    grad_loss.data_ptr<float>(), grad_fe.data_ptr<float>(),
                                                    grad_gw.data_ptr<float>(), grad_fw.data_ptr<float>(),
                                                    gpool.data_ptr<float>(), r.stream),
                "route_head_backward launch");
  kCheck.launch(routing::launch_broadcast_rows(gpool.data_ptr<float>(), grad_x.data_ptr(), kCheck.dtype(x, "x"),
                                               B * C, HW, r.stream),
                "broadcast_rows launch");
}

void dispatch(const at::Tensor& indices, int64_t num_experts, at::Tensor& counts, at::Tensor& offsets,
              at::Tensor& perm) {
  const DeviceGuard guard(indices.device());
  const cudaStream_t stream = current_stream(indices.device());
  kCheck.sized(indices, "indices", indices, at::kLong, indices.numel());
  TORCH_CHECK(num_experts >= 1 && num_experts <= routing::kMaxExperts, "moe_dispatch (cuda): 1 <= num_experts <= ",
              routing::kMaxExperts, ", got ", num_experts);
  kCheck.sized(counts, "counts", indices, at::kLong, num_experts);
  kCheck.sized(offsets, "offsets", indices, at::kLong, num_experts + 1);
  kCheck.sized(perm, "perm", indices, at::kLong, indices.numel());
  kCheck.launch(routing::launch_dispatch(indices.data_ptr<int64_t>(), indices.numel(), static_cast<int>(num_experts),
                                         counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                         perm.data_ptr<int64_t>(), stream),
                "dispatch launch");
}

// The sizes of a combine: B images of k slots, N elements per slot row.
struct CombineShape {
  int64_t B, k, N;
};

CombineShape check_combine(const at::Tensor& eo, const at::Tensor& gates, const at::Tensor& perm) {
  kCheck.device(eo, "expert_out", eo);
  TORCH_CHECK(gates.dim() == 2, "moe_combine (cuda): gates must be (B, k)");
  const int64_t B = gates.size(0), k = gates.size(1);
  TORCH_CHECK(k >= 1 && k <= routing::kMaxTopK, "moe_combine (cuda): 1 <= k <= ", routing::kMaxTopK);
  TORCH_CHECK(eo.dim() >= 1 && eo.size(0) == B * k, "moe_combine (cuda): expert_out must have B*k rows");
  kCheck.sized(gates, "gates", eo, at::kFloat, B * k);
  kCheck.sized(perm, "perm", eo, at::kLong, B * k);
  return {B, k, B * k > 0 ? eo.numel() / (B * k) : 0};
}

void combine(const at::Tensor& eo, const at::Tensor& gates, const at::Tensor& perm, at::Tensor& out) {
  const DeviceGuard guard(eo.device());
  const auto [B, k, N] = check_combine(eo, gates, perm);
  kCheck.device(out, "out", eo);
  TORCH_CHECK(out.numel() == B * N && out.scalar_type() == eo.scalar_type(), "moe_combine (cuda): bad out");
  kCheck.launch(routing::launch_combine(eo.data_ptr(), gates.data_ptr<float>(), perm.data_ptr<int64_t>(),
                                        out.data_ptr(), kCheck.dtype(eo, "expert_out"), B, static_cast<int>(k), N,
                                        current_stream(eo.device())),
                "combine launch");
}

void combine_backward(const at::Tensor& grad, const at::Tensor& eo, const at::Tensor& gates,
                      const at::Tensor& perm, at::Tensor& grad_eo, at::Tensor& grad_gates) {
  const DeviceGuard guard(eo.device());
  const auto [B, k, N] = check_combine(eo, gates, perm);
  kCheck.device(grad, "grad", eo);
  TORCH_CHECK(grad.numel() == B * N && grad.scalar_type() == eo.scalar_type(), "moe_combine_backward (cuda): bad grad");
  kCheck.device(grad_eo, "grad_expert_out", eo);
  TORCH_CHECK(grad_eo.sizes() == eo.sizes() && grad_eo.scalar_type() == eo.scalar_type(),
              "moe_combine_backward (cuda): grad_expert_out must match expert_out");
  kCheck.sized(grad_gates, "grad_gates", eo, at::kFloat, B * k);
  if (B * k == 0 || N == 0) return;
  at::Tensor part =
      at::empty({routing::combine_backward_scratch_floats(B, static_cast<int>(k), N)}, eo.options().dtype(at::kFloat));
  kCheck.launch(routing::launch_combine_backward(grad.data_ptr(), eo.data_ptr(), gates.data_ptr<float>(),
                                                 perm.data_ptr<int64_t>(), grad_eo.data_ptr(),
                                                 grad_gates.data_ptr<float>(), part.data_ptr<float>(),
                                                 kCheck.dtype(eo, "expert_out"), B, static_cast<int>(k), N,
                                                 current_stream(eo.device())),
                "combine_backward launch");
}

}  // namespace

void register_routing(torch::Library& m) {
  define_op(m,
            "moe_route_forward(Tensor x, Tensor freq_emb, Tensor gate_weight, Tensor freq_weight, "
            "Tensor complexity, Tensor noise, int k, float noise_std, bool compute_loss, bool use_complexity, "
            "Tensor(a!) gates, Tensor(b!) indices, Tensor(c!) logits, Tensor(d!) loss) -> ()",
            &route_forward);
  define_op(m,
            "moe_route_backward(Tensor grad_gates, Tensor grad_logits, Tensor grad_loss, Tensor x, "
            "Tensor freq_emb, Tensor gate_weight, Tensor freq_weight, Tensor complexity, Tensor noise, int k, "
            "float noise_std, bool compute_loss, bool use_complexity, Tensor(a!) grad_x, "
            "Tensor(b!) grad_freq_emb, Tensor(c!) grad_gate_weight, Tensor(d!) grad_freq_weight) -> ()",
            &route_backward);
  define_op(m,
            "moe_dispatch(Tensor indices, int num_experts, Tensor(a!) counts, Tensor(b!) offsets, "
            "Tensor(c!) perm) -> ()",
            &dispatch);
  define_op(m, "moe_combine(Tensor expert_out, Tensor gates, Tensor perm, Tensor(a!) out) -> ()", &combine);
  define_op(m,
            "moe_combine_backward(Tensor grad, Tensor expert_out, Tensor gates, Tensor perm, "
            "Tensor(a!) grad_expert_out, Tensor(b!) grad_gates) -> ()",
            &combine_backward);
}

}  // namespace moce
