// The checks the torch wrappers (csrc/*/ops.cpp) make before a launch, each error naming the op family
// (`who`, e.g. "moe routing (cuda)"), the tensor and what is wrong with it; and the int64 -> int32
// argument check and the GroupArgs fill of the grouped ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

#include "common/dtype.h"
#include "common/expert_stage_meta.h"
#include "common/group_args.h"
#include "common/torch_device.h"

namespace moce {

struct Checks {
  const char* who;

  // A launcher's error, as "<who>: <what> failed: <CUDA's message>".
  void launch(cudaError_t err, const char* what) const {
    TORCH_CHECK(err == cudaSuccess, who, ": ", what, " failed: ", cudaGetErrorString(err));
  }

  // The DType of a float32, float16 or bfloat16 tensor.
  DType dtype(const at::Tensor& t, const char* name) const {
    switch (t.scalar_type()) {
      case at::kFloat: return DType::kFloat32;
      case at::kHalf: return DType::kFloat16;
      case at::kBFloat16: return DType::kBFloat16;
      default:
        TORCH_CHECK(false, who, ": ", name, " has unsupported dtype ", t.scalar_type(),
                    "; supported: float32, float16, bfloat16");
    }
    return DType::kFloat32;
  }

  // t is on the kernels' device, on like's device, and contiguous.
  void device(const at::Tensor& t, const char* name, const at::Tensor& like) const {
    TORCH_CHECK(on_kernel_device(t), who, ": ", name, " must be a CUDA tensor");
    TORCH_CHECK(t.device() == like.device(), who, ": ", name, " is on ", t.device(), ", expected ", like.device());
    TORCH_CHECK(t.is_contiguous(), who, ": ", name, " must be contiguous");
  }

  // device(), and of scalar type st.
  void typed(const at::Tensor& t, const char* name, const at::Tensor& like, at::ScalarType st) const {
    device(t, name, like);
    TORCH_CHECK(t.scalar_type() == st, who, ": ", name, " has dtype ", t.scalar_type(), ", expected ", st);
  }

  // typed(), with numel elements.
  void sized(const at::Tensor& t, const char* name, const at::Tensor& like, at::ScalarType st, int64_t numel) const {
    typed(t, name, like, st);
    TORCH_CHECK(t.numel() == numel, who, ": ", name, " must have ", numel, " elements, got ", t.numel());
  }

  // v as a kernel's int argument.
  int to_int(int64_t v, const char* name) const {
    TORCH_CHECK(v >= 0 && v <= INT32_MAX, who, ": ", name, " out of range: ", v);
    return (int)v;
  }

  // The grouping of a grouped op's rows: offsets (E+1,) and meta (E, kRowWidth) int64, perm (N,) int64 or
  // none, kslots >= 1; all on like's device.
  GroupArgs group(const at::Tensor& offsets, const at::Tensor& meta, const std::optional<at::Tensor>& perm,
                  int64_t kslots, const at::Tensor& like) const {
    typed(meta, "meta", like, at::kLong);
    typed(offsets, "offsets", like, at::kLong);
    TORCH_CHECK(meta.dim() == 2 && meta.size(1) == moce_meta::kRowWidth, who, ": meta must be (E, ",
                moce_meta::kRowWidth, "), got ", meta.sizes());
    TORCH_CHECK(offsets.numel() == meta.size(0) + 1, who, ": offsets must have E+1 entries");
    if (perm.has_value()) typed(*perm, "perm", like, at::kLong);
    TORCH_CHECK(kslots >= 1, who, ": kslots must be >= 1");
    return GroupArgs{offsets.data_ptr<int64_t>(), meta.data_ptr<int64_t>(),
                     perm.has_value() ? perm->data_ptr<int64_t>() : nullptr, kslots, (int)meta.size(0)};
  }
};

}  // namespace moce
