// The Kronecker side of the fused adapter, device code: H built from a projection's factors
// (forward, and the CUDA phm_linear), and every parameter gradient from the per-split partial
// dH's the backward's rows_tn kernel leaves (backward). For a projection of phm_dim n,
//
//   H[a*P + p, c*Q + q] = sum_i A[i, a, c] * B_i[p, q],   B_i = S_i @ T_i (rank R) or given
//   dB_i[p, q]  = sum_{a,c} A[i, a, c] * dH[a*P + p, c*Q + q]
//   dA[i, a, c] = sum_{p,q} dH[a*P + p, c*Q + q] * B_i[p, q]
//   dS_i = dB_i @ T_i^T,   dT_i = S_i^T @ dB_i
//
// and a dense projection's weight gradient is dH itself. Factors, weights and biases may have
// any float dtype (their gradients are written in it); everything is summed in fp32, in a
// fixed order (no atomics), so the gradients are bit-identical from run to run.
#pragma once

#include "adapter_common.cuh"

namespace compacter_kernels {
namespace adapter {
namespace {

__device__ __forceinline__ void store1_dyn(void* base, int dt, int64_t i, float v) {
  switch (dt) {
    case kF16: static_cast<c10::Half*>(base)[i] = c10::Half(v); break;
    case kBF16: static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(v); break;
    case kF64: static_cast<double*>(base)[i] = v; break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

// One projection's factors: rule (n, n, n), left S (n, P, R) or B (n, P, Q), right T (n, R, Q)
// or nullptr; rule nullptr: a dense (P, Q) matrix in left (n = 1).
struct Factors {
  const void* rule = nullptr;
  const void* left = nullptr;
  const void* right = nullptr;
  int rule_dt = kF32, left_dt = kF32, right_dt = kF32;
  int64_t n = 0, P = 0, Q = 0, R = 0;  // n = 0: no projection

  __device__ float B(int64_t i, int64_t p, int64_t q) const {
    if (right == nullptr) return load1_dyn(left, left_dt, (i * P + p) * Q + q);
    float b = 0.f;
    for (int64_t r = 0; r < R; ++r)
      b += load1_dyn(left, left_dt, (i * P + p) * R + r) * load1_dyn(right, right_dt, (i * R + r) * Q + q);
    return b;
  }
  __device__ float A(int64_t i, int64_t a, int64_t c) const { return load1_dyn(rule, rule_dt, (i * n + a) * n + c); }
};

// ---- H from the factors -------------------------------------------------------------------------

struct BuildHArgs {
  Factors f[2];
  void* out[2];  // (n*P, n*Q) of dtype out_dt, contiguous; nullptr: nothing to build
  int out_dt;
};

// One thread per element of H (grid-stride over both projections' H, one launch); a dense
// projection's matrix is converted to out_dt.
__global__ void __launch_bounds__(256) build_h_kernel(const BuildHArgs a) {
  const int64_t total0 = a.out[0] ? a.f[0].n * a.f[0].P * a.f[0].n * a.f[0].Q : 0;
  const int64_t total1 = a.out[1] ? a.f[1].n * a.f[1].P * a.f[1].n * a.f[1].Q : 0;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total0 + total1;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int w = idx < total0 ? 0 : 1;
    const Factors& f = a.f[w];
    const int64_t e = idx - (w ? total0 : 0), O = f.n * f.Q;
    const int64_t row = e / O, col = e - row * O;
    float h;
    if (f.rule == nullptr) {
      h = load1_dyn(f.left, f.left_dt, e);
    } else {
      const int64_t ai = row / f.P, p = row - ai * f.P, c = col / f.Q, q = col - c * f.Q;
      h = 0.f;
      for (int64_t i = 0; i < f.n; ++i) h += f.A(i, ai, c) * f.B(i, p, q);
    }
    store1_dyn(a.out[w], a.out_dt, e, h);
  }
}

// ---- every parameter gradient from the split partials of dH -------------------------------------

constexpr int kGradThreads = kThreads;
constexpr int64_t kGradChunk = 1024;  // elements of B_i a block holds in shared memory at once

struct ProjGrads {
  Factors f;
  const float* part = nullptr;  // dH[row, col] of split s at part[s * split_stride + row * s_row + col]
  int64_t s_row = 0;
  float scale = 1.f;
  void* drule = nullptr;  // nullptr: not wanted here (the shared rule's goes with projection 0's)
  void* dleft = nullptr;
  void* dright = nullptr;
  int64_t chunk_rows = 1;  // rows of B_i (PHM) or of the matrix (dense, per block) at a time
};

struct Bias {
  void* out = nullptr;  // nullptr: no bias
  int dt = kF32;
  int64_t offset = 0, len = 0;  // its columns in csum
  float scale = 1.f;
};

struct FactorGradArgs {
  ProjGrads g[2];
  Bias bias[2];
  const float* csum = nullptr;  // (splits, cs_stride) partial column sums
  int64_t splits = 1, split_stride = 0, cs_stride = 0;
  bool shared_rule = false;     // g[0].f.rule is g[1].f.rule: its whole gradient goes to g[0].drule
  int64_t nn = 1, chunk = 1, dt_len = 1;  // shared-memory sizes (floats): dA, dB and B, dT
};

inline int64_t factor_grads_smem_bytes(const FactorGradArgs& a) {
  return (kGradThreads + 2 * a.nn + 2 * a.chunk + a.dt_len) * int64_t{sizeof(float)};
}

// scale * sum over splits of dH[row, col], in split order.
__device__ __forceinline__ float dh_at(const FactorGradArgs& a, const ProjGrads& g, int64_t row, int64_t col) {
  float t = 0.f;
  for (int64_t s = 0; s < a.splits; ++s) t += g.part[s * a.split_stride + row * g.s_row + col];
  return t * g.scale;
}

// Sum of v over the block's threads in a fixed order (a tree in shared memory), for every thread.
__device__ float block_sum(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kGradThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float total = red[0];
  __syncthreads();
  return total;
}

// Slice i of a PHM projection: stores d left[i] and d right[i], leaves d rule[i] in dA (n*n).
__device__ void phm_slice_grads(const FactorGradArgs& a, const ProjGrads& g, int64_t i, float* red, float* dA,
                                float* dB, float* Bv, float* dT) {
  const Factors& f = g.f;
  const int64_t n = f.n, P = f.P, Q = f.Q, R = f.R, tid = threadIdx.x;
  const bool factored = f.right != nullptr;
  for (int64_t e = tid; e < n * n; e += kGradThreads) dA[e] = 0.f;
  if (factored)
    for (int64_t e = tid; e < R * Q; e += kGradThreads) dT[e] = 0.f;
  for (int64_t p0 = 0; p0 < P; p0 += g.chunk_rows) {
    const int64_t rows = std::min(g.chunk_rows, P - p0), E = rows * Q;
    // Each thread keeps to its own elements e until the barrier after the (a, c) loop.
    for (int64_t e = tid; e < E; e += kGradThreads) {
      Bv[e] = f.B(i, p0 + e / Q, e % Q);
      dB[e] = 0.f;
    }
    for (int64_t ai = 0; ai < n; ++ai)
      for (int64_t c = 0; c < n; ++c) {
        const float A = f.A(i, ai, c);
        float acc = 0.f;
        for (int64_t e = tid; e < E; e += kGradThreads) {
          const float t = dh_at(a, g, ai * P + p0 + e / Q, c * Q + e % Q);
          dB[e] += A * t;
          acc += t * Bv[e];
        }
        const float total = block_sum(acc, red);
        if (tid == 0) dA[ai * n + c] += total;
      }
    __syncthreads();  // dB of the chunk complete
    if (factored) {
      for (int64_t j = tid; j < rows * R; j += kGradThreads) {  // d S_i[p, r] = sum_q dB[p, q] T_i[r, q]
        const int64_t pr = j / R, r = j - pr * R;
        float s = 0.f;
        for (int64_t q = 0; q < Q; ++q) s += dB[pr * Q + q] * load1_dyn(f.right, f.right_dt, (i * R + r) * Q + q);
        store1_dyn(g.dleft, f.left_dt, (i * P + p0 + pr) * R + r, s);
      }
      for (int64_t j = tid; j < R * Q; j += kGradThreads) {  // d T_i[r, q] += sum_p S_i[p, r] dB[p, q]
        const int64_t r = j / Q, q = j - r * Q;
        float s = 0.f;
        for (int64_t pr = 0; pr < rows; ++pr) s += load1_dyn(f.left, f.left_dt, (i * P + p0 + pr) * R + r) * dB[pr * Q + q];
        dT[j] += s;
      }
    } else {
      for (int64_t e = tid; e < E; e += kGradThreads) store1_dyn(g.dleft, f.left_dt, (i * P + p0) * Q + e, dB[e]);
    }
    __syncthreads();  // before the next chunk overwrites dB and Bv
  }
  if (factored)
    for (int64_t j = tid; j < R * Q; j += kGradThreads) store1_dyn(g.dright, f.right_dt, i * R * Q + j, dT[j]);
}

// Block (i, chunk): slice i of each PHM projection (in chunk 0, all its rows: d rule and d right
// sum over them) and rows chunk * chunk_rows.. of each dense projection (i = 0); block (0, 0)
// also sums the biases.
__global__ void __launch_bounds__(kGradThreads) factor_grads_kernel(const FactorGradArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* red = reinterpret_cast<float*>(smem);
  float* dA = red + kGradThreads;  // two projections' n*n
  float* dB = dA + 2 * a.nn;
  float* Bv = dB + a.chunk;
  float* dT = Bv + a.chunk;
  const int64_t i = blockIdx.x, chunk = blockIdx.y, tid = threadIdx.x;
  for (int w = 0; w < 2; ++w) {
    const ProjGrads& g = a.g[w];
    if (g.f.n == 0 || i >= g.f.n) continue;  // uniform over the block
    if (g.f.rule == nullptr) {
      const int64_t lo = chunk * g.chunk_rows, hi = std::min(g.f.P, lo + g.chunk_rows);
      for (int64_t e = lo * g.f.Q + tid; e < hi * g.f.Q; e += kGradThreads)
        store1_dyn(g.dleft, g.f.left_dt, e, dh_at(a, g, e / g.f.Q, e % g.f.Q));
    } else if (chunk == 0) {
      phm_slice_grads(a, g, i, red, dA + w * a.nn, dB, Bv, dT);
    }
  }
  __syncthreads();  // dA complete
  if (chunk == 0) {
    for (int w = 0; w < 2; ++w) {
      const ProjGrads& g = a.g[w];
      if (g.drule == nullptr || i >= g.f.n) continue;
      const int64_t n = g.f.n;
      for (int64_t e = tid; e < n * n; e += kGradThreads) {
        const float v = dA[w * a.nn + e] + (w == 0 && a.shared_rule ? dA[a.nn + e] : 0.f);
        store1_dyn(g.drule, g.f.rule_dt, i * n * n + e, v);
      }
    }
    if (i == 0) {
      for (const Bias& b : a.bias) {
        if (b.out == nullptr) continue;
        for (int64_t j = tid; j < b.len; j += kGradThreads) {
          float t = 0.f;
          for (int64_t s = 0; s < a.splits; ++s) t += a.csum[s * a.cs_stride + b.offset + j];
          store1_dyn(b.out, b.dt, j, t * b.scale);
        }
      }
    }
  }
}

}  // namespace
}  // namespace adapter
}  // namespace compacter_kernels
