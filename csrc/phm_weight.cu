// phm_weight: H = sum_i kron(A[i], B[i]), with B[i] = S[i] @ T[i] (factorised) or B given.
//   H[a*(I/n)+p, c*(O/n)+q] = sum_i A[i,a,c] * B[i,p,q]
// One thread per element of H; n and r are small (4..12, 1..8), so each thread recomputes its
// B[i,p,q] on the fly instead of materialising B (cheaper than a second launch and buffer).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>  // per-operator header: much lighter to compile than ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header (at::cuda::getCurrentCUDAStream is an alias of c10::cuda's) rather than
// ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers of a full toolkit.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "checks.h"

namespace compacter_kernels {
namespace {

template <typename scalar_t>
__global__ void phm_weight_kernel(const scalar_t* __restrict__ rule,   // (n, n, n)
                                  const scalar_t* __restrict__ left,   // (n, Ib, r) or (n, Ib, Ob)
                                  const scalar_t* __restrict__ right,  // (n, r, Ob) or nullptr
                                  scalar_t* __restrict__ out,          // (n*Ib, n*Ob)
                                  int64_t n, int64_t Ib, int64_t Ob, int64_t r) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bf16/float, double for double
  const int64_t O = n * Ob;
  const int64_t total = n * Ib * O;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / O, col = idx - row * O;
    const int64_t a = row / Ib, p = row - a * Ib;
    const int64_t c = col / Ob, q = col - c * Ob;
    acc_t acc = 0;
    for (int64_t i = 0; i < n; ++i) {
      acc_t b;
      if (right != nullptr) {
        const scalar_t* s = left + (i * Ib + p) * r;        // S[i, p, :]
        const scalar_t* t = right + i * r * Ob + q;         // T[i, :, q], stride Ob
        b = 0;
        for (int64_t k = 0; k < r; ++k) b += static_cast<acc_t>(s[k]) * static_cast<acc_t>(t[k * Ob]);
      } else {
        b = static_cast<acc_t>(left[(i * Ib + p) * Ob + q]);
      }
      acc += static_cast<acc_t>(rule[(i * n + a) * n + c]) * b;
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

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
