// Torch-facing wrappers of the expert-stage kernels: input checks, launch on the current stream.
// Outputs are allocated by the Python side (moce_kernels/cuda/experts.py, through the shared driver
// moce_kernels/ops/grouped_conv.py) and passed in; every op returns nothing.
// Ops (namespace moce_C): expert_epilogue, expert_epilogue_backward, gather_sum.
#include "expert_stage/ops.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "common/torch_checks.h"
#include "common/torch_device.h"
#include "expert_stage/kernels.h"

namespace moce {
namespace {

constexpr Checks kCheck{"expert_stage (cuda)"};

// The arguments both epilogue directions share: the grouping (perm required), shared, attn and the
// packed weights (of shared's dtype), the sizes.
void set_epilogue_args(expert_stage::EpilogueArgs& p, const at::Tensor& shared, const at::Tensor& attn,
                       const at::Tensor& w, const at::Tensor& offsets, const at::Tensor& meta, const at::Tensor& perm,
                       int64_t kslots, int64_t N, int64_t C, int64_t HW, int64_t max_r) {
  for (const auto& [t, name] : {std::make_pair(&shared, "shared"), std::make_pair(&attn, "attn"),
                                std::make_pair(&w, "w")})
    kCheck.typed(*t, name, shared, shared.scalar_type());
  static_cast<GroupArgs&>(p) = kCheck.group(offsets, meta, perm, kslots, shared);
  p.shared = shared.data_ptr();
  p.attn = attn.data_ptr();
  p.w = w.data_ptr();
  p.N = kCheck.to_int(N, "N");
  p.C = kCheck.to_int(C, "C");
  p.HW = kCheck.to_int(HW, "HW");
  p.max_r = kCheck.to_int(max_r, "max_r");
}

void expert_epilogue(const at::Tensor& xs, const at::Tensor& shared, const at::Tensor& attn, const at::Tensor& w,
                     at::Tensor& out, const at::Tensor& offsets, const at::Tensor& meta, const at::Tensor& perm,
                     int64_t kslots, int64_t N, int64_t C, int64_t HW, bool x_gather, int64_t max_r) {
  const DeviceGuard guard(shared.device());
  const DType dt = kCheck.dtype(shared, "shared");
  kCheck.typed(xs, "xs", shared, shared.scalar_type());
  kCheck.typed(out, "out", shared, shared.scalar_type());
  expert_stage::EpilogueParams p{};
  set_epilogue_args(p, shared, attn, w, offsets, meta, perm, kslots, N, C, HW, max_r);
  p.xs = xs.data_ptr();
  p.out = out.data_ptr();
  p.x_gather = x_gather;
  kCheck.launch(expert_stage::launch_epilogue(dt, p, current_stream(shared.device())), "expert epilogue");
}

void expert_epilogue_backward(const at::Tensor& g, const at::Tensor& shared, const at::Tensor& attn,
                              const at::Tensor& w, at::Tensor& gt, at::Tensor& gu, at::Tensor& h,
                              const at::Tensor& offsets, const at::Tensor& meta, const at::Tensor& perm,
                              int64_t kslots, int64_t N, int64_t C, int64_t HW, int64_t max_r) {
  const DeviceGuard guard(shared.device());
  const DType dt = kCheck.dtype(shared, "shared");
  kCheck.device(g, "g", shared);
  const bool g_f32 = g.scalar_type() == at::kFloat && shared.scalar_type() != at::kFloat;
  TORCH_CHECK(g_f32 || g.scalar_type() == shared.scalar_type(), kCheck.who, ": g must be float32 or shared's dtype");
  for (const auto& [t, name] : {std::make_pair(&gt, "gt"), std::make_pair(&gu, "gu"), std::make_pair(&h, "h")})
    kCheck.typed(*t, name, shared, shared.scalar_type());
  expert_stage::EpilogueBwdParams p{};
  set_epilogue_args(p, shared, attn, w, offsets, meta, perm, kslots, N, C, HW, max_r);
  p.g = g.data_ptr();
  p.g_f32 = g_f32;
  p.gt = gt.data_ptr();
  p.gu = gu.data_ptr();
  p.h = h.data_ptr();
  kCheck.launch(expert_stage::launch_epilogue_backward(dt, p, current_stream(shared.device())),
                "expert epilogue backward");
}

void gather_sum(const at::Tensor& src, const at::Tensor& inv, at::Tensor& out, int64_t kslots) {
  const DeviceGuard guard(out.device());
  const DType dt = kCheck.dtype(out, "out");
  kCheck.device(out, "out", out);
  kCheck.typed(src, "src", out, at::kFloat);
  kCheck.typed(inv, "inv", out, at::kLong);
  TORCH_CHECK(kslots >= 1 && out.dim() >= 1, kCheck.who, ": bad gather_sum arguments");
  const int64_t B = out.size(0), L = out.numel() / std::max<int64_t>(B, 1);
  TORCH_CHECK(src.numel() == B * kslots * L && inv.numel() == B * kslots, kCheck.who,
              ": gather_sum src must be (B*k, ...) and inv (B*k,)");
  kCheck.launch(expert_stage::launch_gather_sum(dt, src.data_ptr<float>(), inv.data_ptr<int64_t>(), out.data_ptr(),
                                                B, L, kslots, current_stream(out.device())),
                "gather-sum");
}

}  // namespace

void register_expert_stage(torch::Library& m) {
  define_op(m,
            "expert_epilogue(Tensor xs, Tensor shared, Tensor attn, Tensor w, Tensor(a!) out, Tensor offsets, "
            "Tensor meta, Tensor perm, int kslots, int N, int C, int HW, bool x_gather, int max_r) -> ()",
            &expert_epilogue);
  define_op(m,
            "expert_epilogue_backward(Tensor g, Tensor shared, Tensor attn, Tensor w, Tensor(a!) gt, Tensor(b!) gu, "
            "Tensor(c!) h, Tensor offsets, Tensor meta, Tensor perm, int kslots, int N, int C, int HW, "
            "int max_r) -> ()",
            &expert_epilogue_backward);
  define_op(m, "gather_sum(Tensor src, Tensor inv, Tensor(a!) out, int kslots) -> ()", &gather_sum);
}

}  // namespace moce
