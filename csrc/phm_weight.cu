// The CUDA entry point of phm_weight (H = sum_i kron(A[i], B[i]); the kernel is in phm_weight.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>  // per-operator header: much lighter to compile than ATen/ATen.h
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header (at::cuda::getCurrentCUDAStream is an alias of c10::cuda's) rather than
// ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers of a full toolkit.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "checks.h"
#include "phm_weight.cuh"

namespace compacter_kernels {
namespace {

at::Tensor phm_weight_cuda(const at::Tensor& rule, const at::Tensor& left,
                           const std::optional<at::Tensor>& right_opt) {
  CHECK_DEVICE(rule);
  CHECK_DEVICE(left);
  CHECK_CONTIGUOUS(rule);
  CHECK_CONTIGUOUS(left);
  const auto dtype = left.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "phm_weight: unsupported dtype ", dtype, " (float32, float16, bfloat16, float64)");
  TORCH_CHECK(rule.scalar_type() == dtype, "phm_weight: rule has dtype ", rule.scalar_type(),
              " but left has ", dtype, "; they must match");
  TORCH_CHECK(rule.dim() == 3 && left.dim() == 3, "phm_weight: rule and left must be 3-D, got ",
              rule.sizes(), " and ", left.sizes());
  const int64_t n = rule.size(0);
  TORCH_CHECK(n > 0, "phm_weight: phm_dim n must be positive");
  CHECK_SAME_DEVICE(left, rule);
  CHECK_SHAPE(rule, n, n, n);
  const int64_t Ib = left.size(1);
  int64_t Ob, r = 0;
  const bool factorised = right_opt.has_value();
  if (factorised) {
    const at::Tensor& right = *right_opt;
    CHECK_DEVICE(right);
    CHECK_SAME_DEVICE(right, rule);
    CHECK_CONTIGUOUS(right);
    TORCH_CHECK(right.scalar_type() == dtype, "phm_weight: right has dtype ", right.scalar_type(),
                " but left has ", dtype, "; they must match");
    TORCH_CHECK(right.dim() == 3, "phm_weight: right must be 3-D (n, r, O/n), got ", right.sizes());
    r = left.size(2);
    Ob = right.size(2);
    CHECK_SHAPE(left, n, Ib, r);
    CHECK_SHAPE(right, n, r, Ob);
  } else {
    Ob = left.size(2);
    CHECK_SHAPE(left, n, Ib, Ob);
  }

  c10::cuda::CUDAGuard device_guard{left.device()};
  auto out = at::empty({n * Ib, n * Ob}, left.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  // A zero rank makes every B zero: keep the kernel free of that corner case.
  if (factorised && r == 0) return out.zero_();

  constexpr int threads = 256;
  // Grid-stride loop: cap the grid so huge H does not overflow gridDim.x.
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t{1} << 20);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "phm_weight_cuda", [&] {
    phm_weight_kernel<scalar_t><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
        rule.data_ptr<scalar_t>(), left.data_ptr<scalar_t>(),
        factorised ? right_opt->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), n, Ib, Ob, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(compacter_kernels, CUDA, m) { m.impl("phm_weight", &phm_weight_cuda); }

}  // namespace compacter_kernels
