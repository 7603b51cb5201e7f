// The phm_weight kernel: H = sum_i kron(A[i], B[i]), with B[i] = S[i] @ T[i] (factorised) or B
// given. Device code only: the entry point is in phm_weight.cu, and the CPU emulation in
// tests/cuda_emulation/ runs this same kernel.
//   H[a*(I/n)+p, c*(O/n)+q] = sum_i A[i,a,c] * B[i,p,q]
// One thread per element of H; n and r are small (4..12, 1..8), so each thread recomputes its
// B[i,p,q] on the fly instead of materialising B (cheaper than a second launch and buffer).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

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

}  // namespace
}  // namespace compacter_kernels
