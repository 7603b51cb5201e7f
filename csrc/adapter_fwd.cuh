// Fused bottleneck adapter, forward, for dense H_down (d, k) and H_up (k, d):
//
//   z = x @ H_down + b_down        (M, k), fp32 accumulation, rounded to x's dtype (saved for backward)
//   g = act(z)                     from the rounded z, rounded to x's dtype (the second product's operand)
//   u = g @ H_up + b_up            rounded to x's dtype (as the reference rounds it)
//   y = r + scale * u,             r = residual or x, y in out_dtype
//
// One block of 128 threads per BM rows (BM = 32, or 16 when k > 128). The block walks d in
// kBD-column chunks twice: first accumulating z (tensor cores for fp16/bf16, FMA for fp32),
// then producing y chunk by chunk. x's rows stay in shared memory between the two walks when
// they fit (kDefaultResidentBytes), so x is read from global memory once; y is written once.
// The Python side (compacter_kernels/ops/cuda_adapter.py) builds H from the PHM factors; the
// launch is in adapter.cu.
#pragma once

#include "adapter_common.cuh"

namespace compacter_kernels {
namespace adapter {
namespace {

struct FwdArgs {
  const void* x;          // T (M, d), row stride sx, unit column stride
  const void* residual;   // (M, d) of dtype residual_dt, row stride sr; nullptr: r = x
  const void* h_down;     // T (d, k) contiguous
  const void* b_down;     // (k) of dtype b_down_dt (T or fp32), or nullptr
  const void* h_up;       // T (k, d) contiguous
  const void* b_up;       // (d) of dtype b_up_dt (T or fp32), or nullptr
  void* y;                // (M, d) contiguous, dtype y_dt
  void* z;                // T (M, k) contiguous
  int64_t sx, sr, M, d, k;
  int residual_dt, y_dt, b_down_dt, b_up_dt, act;
  float scale;
  Layout L;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) adapter_fwd_kernel(const FwdArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout& L = a.L;
  T* xs = reinterpret_cast<T*>(smem);  // x: whole rows (resident) or one chunk
  T* hs = reinterpret_cast<T*>(smem + L.off_h);
  T* gs = reinterpret_cast<T*>(smem + L.off_k);
  float* st = reinterpret_cast<float*>(smem + L.off_st);
  constexpr int dt = DTypeOf<T>::value;
  const T* x = static_cast<const T*>(a.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * L.BM;
  const int FM = L.BM / 16, FK = L.KP / 16, FN = kBD / 16;
  Acc<T> acc[kFragsPerWarp];

  // 1. z = x @ H_down, accumulated over d. More than one pass only for k > 256 (then a
  //    streaming x is read once per pass).
  const int passes1 = static_cast<int>(ceil_div(FM * FK, kTilesPerPass));
  for (int pass = 0; pass < passes1; ++pass) {
    block_zero<T>(acc);
    for (int64_t d0 = 0; d0 < a.d; d0 += kBD) {
      __syncthreads();  // the previous chunk's tiles are consumed
      T* xt = L.resident ? xs + d0 : xs;
      if (!L.resident || pass == 0) load_tile(xt, L.ldr, a.x, dt, a.sx, row0, a.M, d0, a.d, L.BM, kBD);
      load_tile(hs, L.ldh_dk, a.h_down, dt, a.k, d0, a.d, 0, a.k, kBD, L.KP);
      __syncthreads();
      block_mma<T, false, false>(acc, pass, FM, FK, kBD / 16, xt, L.ldr, hs, L.ldh_dk);
    }
    block_store<T>(acc, pass, FM, FK, st, L.ldst);
  }
  __syncthreads();

  // Epilogue 1: z (+ b_down) out in T, g = act(z) into shared memory; padded columns of g are 0.
  // z and u are rounded to T where the reference rounds them, so a low-precision bottleneck that
  // overflows gives the reference's inf/nan (gelu(-inf) is nan), and backward sees forward's z.
  T* z = static_cast<T*>(a.z);
  for (int i = threadIdx.x; i < L.BM * L.KP; i += kThreads) {
    const int r = i / L.KP, c = i - r * L.KP;
    const int64_t gr = row0 + r;
    float v = st[r * L.ldst + c];
    float g = 0.f;
    if (c < a.k) {
      if (a.b_down != nullptr) v += load1_dyn(a.b_down, a.b_down_dt, c);
      const T zt = T(v);
      if (gr < a.M && z != nullptr) z[gr * a.k + c] = zt;  // nullptr: no backward will read z
      g = act_fwd(static_cast<float>(zt), a.act);
    }
    gs[r * L.ldk + c] = T(g);
  }

  // 2. y = r + scale * (g @ H_up + b_up), one kBD-column chunk at a time.
  const int passes2 = static_cast<int>(ceil_div(FM * FN, kTilesPerPass));
  for (int64_t d0 = 0; d0 < a.d; d0 += kBD) {
    __syncthreads();  // g is complete; the stage and the H tile are free
    load_tile(hs, L.ldh_kd, a.h_up, dt, a.d, 0, a.k, d0, a.d, L.KP, kBD);
    __syncthreads();
    for (int pass = 0; pass < passes2; ++pass) {
      block_zero<T>(acc);
      block_mma<T, false, false>(acc, pass, FM, FN, L.KP / 16, gs, L.ldk, hs, L.ldh_kd);
      block_store<T>(acc, pass, FM, FN, st, L.ldst);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < L.BM * (kBD / 8); i += kThreads) {
      const int r = i / (kBD / 8), c = (i - r * (kBD / 8)) * 8;
      const int64_t gr = row0 + r, gc = d0 + c;
      const int n = gr < a.M ? static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, a.d - gc))) : 0;
      if (n == 0) continue;
      float u[8], b[8], res[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) u[j] = st[r * L.ldst + c + j];
      if (a.b_up != nullptr) {
        load8_dyn(a.b_up, a.b_up_dt, gc, n, b);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = 0.f;
      }
      if (a.residual != nullptr) {
        load8_dyn(a.residual, a.residual_dt, gr * a.sr + gc, n, res);
      } else if (L.resident) {
        load8(xs + r * L.ldr + gc, n, res);  // x kept from step 1: no second global read
      } else {
        load8(x + gr * a.sx + gc, n, res);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) u[j] = res[j] + a.scale * static_cast<float>(T(u[j] + b[j]));
      store8_dyn(a.y, a.y_dt, gr * a.d + gc, n, u);
    }
  }
}

}  // namespace
}  // namespace adapter
}  // namespace compacter_kernels
