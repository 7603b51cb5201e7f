// Fused bottleneck adapter, backward, for dense H_down (d, k) and H_up (k, d). With dy the
// incoming gradient (its dtype may be wider than x's under autocast: converted on load),
//
//   dg = dy @ H_up^T                          (M, k)
//   dz = scale * dg * act'(z)                 rounded to x's dtype
//   dx = [dy +] dz @ H_down^T                 (the dy term only without a residual tensor)
//   dH_down = x^T @ dz        db_down = sum_rows dz
//   dH_up   = scale * g^T @ dy    db_up = scale * sum_rows dy,   g = act(z) rounded to x's dtype
//
// Three launches in all:
// Kernel 1 (one block per BM rows, the forward's structure): dg over d in kBD chunks (tensor
// cores for fp16/bf16; H_up^T and H_down^T are read as column-major tiles of H, no transposes),
// the elementwise step, then dx chunk by chunk; it writes dx, d residual (a copy of dy, with a
// residual tensor), and g and dz (M x k each) for:
// Kernel 2 (rows_tn, both products in one launch): out[s] = A[rows of split s]^T @ B[rows of
// split s] in fp32 and the column sums of B, one split of rows per block along grid.y, into
// per-split partial buffers.
// Kernel 3 (factor_grads_kernel, adapter_factors.cuh) sums the partials over the splits in a
// fixed order and maps dH to the factors' gradients. No atomics: the gradients are
// bit-identical from run to run on a given GPU.
// Why the parameter gradients are not summed inside kernel 1: per-row-block partials of d x k
// would move 4k/BM times the bytes of x (1.5x at k=24), and a persistent accumulation needs
// float atomics; a split-M reduction reads x (not otherwise needed here) and dy once more.
#pragma once

#include "adapter_common.cuh"

namespace compacter_kernels {
namespace adapter {
namespace {

// ---- kernel 1: dx, g, dz ------------------------------------------------------------------------

struct BwdArgs {
  const void* dy;      // (M, d) of dtype dy_dt, row stride sdy, unit column stride
  const void* z;       // T (M, k) contiguous (saved by the forward)
  const void* h_down;  // T (d, k) contiguous
  const void* h_up;    // T (k, d) contiguous
  void* dx;            // T (M, d) contiguous
  void* g;             // T (M, k) contiguous
  void* dz;            // T (M, k) contiguous
  void* dres;          // (M, d) contiguous in dy's dtype (esize dy_es): a copy of dy, or nullptr
  int64_t sdy, M, d, k;
  int dy_dt, dy_es, act;
  float scale;
  bool has_residual;
  Layout L;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) adapter_bwd_kernel(const BwdArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout& L = a.L;
  T* dys = reinterpret_cast<T*>(smem);  // dy in T: whole rows (resident) or one chunk
  T* hs = reinterpret_cast<T*>(smem + L.off_h);
  T* dzs = reinterpret_cast<T*>(smem + L.off_k);
  float* st = reinterpret_cast<float*>(smem + L.off_st);
  constexpr int dt = DTypeOf<T>::value;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * L.BM;
  const int FM = L.BM / 16, FK = L.KP / 16, FN = kBD / 16;
  Acc<T> acc[kFragsPerWarp];

  // d residual = dy, bit for bit, in dy's dtype (a tensor of its own: autograd may keep it).
  if (a.dres != nullptr) {
    for (int64_t r = row0; r < std::min<int64_t>(row0 + L.BM, a.M); ++r) {
      for (int64_t c = threadIdx.x; c < a.d; c += kThreads) {
        const int64_t from = r * a.sdy + c, to = r * a.d + c;
        switch (a.dy_es) {
          case 2: static_cast<uint16_t*>(a.dres)[to] = static_cast<const uint16_t*>(a.dy)[from]; break;
          case 8: static_cast<uint64_t*>(a.dres)[to] = static_cast<const uint64_t*>(a.dy)[from]; break;
          default: static_cast<uint32_t*>(a.dres)[to] = static_cast<const uint32_t*>(a.dy)[from]; break;
        }
      }
    }
  }

  // 1. dg = dy @ H_up^T. The H_up tile is stored as it is in memory, KP x kBD row-major, and read
  //    as the column-major kBD x KP operand H_up^T.
  const int passes1 = static_cast<int>(ceil_div(FM * FK, kTilesPerPass));
  for (int pass = 0; pass < passes1; ++pass) {
    block_zero<T>(acc);
    for (int64_t d0 = 0; d0 < a.d; d0 += kBD) {
      __syncthreads();
      T* dyt = L.resident ? dys + d0 : dys;
      if (!L.resident || pass == 0) load_tile(dyt, L.ldr, a.dy, a.dy_dt, a.sdy, row0, a.M, d0, a.d, L.BM, kBD);
      load_tile(hs, L.ldh_kd, a.h_up, dt, a.d, 0, a.k, d0, a.d, L.KP, kBD);
      __syncthreads();
      block_mma<T, false, true>(acc, pass, FM, FK, kBD / 16, dyt, L.ldr, hs, L.ldh_kd);
    }
    block_store<T>(acc, pass, FM, FK, st, L.ldst);
  }
  __syncthreads();

  // Elementwise: dz = scale * dg * act'(z) (0 in padded rows and columns), g = act(z).
  const T* z = static_cast<const T*>(a.z);
  T* dz_out = static_cast<T*>(a.dz);
  T* g_out = static_cast<T*>(a.g);
  for (int i = threadIdx.x; i < L.BM * L.KP; i += kThreads) {
    const int r = i / L.KP, c = i - r * L.KP;
    const int64_t gr = row0 + r;
    float dzv = 0.f;
    if (c < a.k && gr < a.M) {
      const float zv = static_cast<float>(z[gr * a.k + c]);
      const T dz_t = T(a.scale * st[r * L.ldst + c] * act_bwd(zv, a.act));
      dz_out[gr * a.k + c] = dz_t;
      g_out[gr * a.k + c] = T(act_fwd(zv, a.act));
      dzv = static_cast<float>(dz_t);
    }
    dzs[r * L.ldk + c] = T(dzv);
  }

  // 2. dx = [dy +] dz @ H_down^T. The H_down tile is kBD x KP row-major (rows d0..), read as the
  //    column-major KP x kBD operand H_down^T.
  T* dx = static_cast<T*>(a.dx);
  const int passes2 = static_cast<int>(ceil_div(FM * FN, kTilesPerPass));
  for (int64_t d0 = 0; d0 < a.d; d0 += kBD) {
    __syncthreads();
    load_tile(hs, L.ldh_dk, a.h_down, dt, a.k, d0, a.d, 0, a.k, kBD, L.KP);
    __syncthreads();
    for (int pass = 0; pass < passes2; ++pass) {
      block_zero<T>(acc);
      block_mma<T, false, true>(acc, pass, FM, FN, L.KP / 16, dzs, L.ldk, hs, L.ldh_dk);
      block_store<T>(acc, pass, FM, FN, st, L.ldst);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < L.BM * (kBD / 8); i += kThreads) {
      const int r = i / (kBD / 8), c = (i - r * (kBD / 8)) * 8;
      const int64_t gr = row0 + r, gc = d0 + c;
      const int n = gr < a.M ? static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, a.d - gc))) : 0;
      if (n == 0) continue;
      float v[8], dyv[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = st[r * L.ldst + c + j];
      if (!a.has_residual) {
        // dy in its own precision (resident only when its dtype is T, so this is exact).
        if (L.resident) {
          load8(dys + r * L.ldr + gc, n, dyv);
        } else {
          load8_dyn(a.dy, a.dy_dt, gr * a.sdy + gc, n, dyv);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] += dyv[j];
      }
      store8(dx + gr * a.d + gc, n, v);
    }
  }
}

// ---- kernel 2: per-split A^T @ B and column sums of B, for two products in one launch --------

constexpr int kRA = 64, kRB = 64, kRM = 32;  // output tile kRA x kRB, kRM rows per step
static_assert((kRA / 16) * (kRB / 16) == kTilesPerPass, "rows_tn keeps its whole tile in one pass");

struct RowsTnProduct {
  const void* a;   // T (M, IA), row stride sa
  const void* b;   // (M, IB) of dtype b_dt, row stride sb (converted to T for the product)
  float* part;     // split s at part + s * split_stride: (IA, IB)
  float* colsum;   // split s at colsum + s * cs_stride: (IB)
  int64_t sa, sb, IA, IB;
  int b_dt;
};

struct RowsTnArgs {
  RowsTnProduct prod[2];  // blocks 0..tiles0-1 take the first product's tiles, the rest the second's
  int64_t tiles0, M, rows_per_split, split_stride, cs_stride;
};

template <typename T>
constexpr int64_t rows_tn_smem_bytes() {
  return round_up(int64_t{kRM} * (kRA + kPad + kRB + kPad) * sizeof(T), 128) + int64_t{kRA} * (kRB + kStagePad) * 4;
}
static_assert(rows_tn_smem_bytes<float>() <= 48 * 1024, "rows_tn fits the default 48 KiB of shared memory");

inline int64_t rows_tn_tiles(int64_t IA, int64_t IB) { return ceil_div(IA, kRA) * ceil_div(IB, kRB); }

// How rows_tn splits the M rows: about two waves of blocks over all (tile, split) pairs, and
// every split a whole number of kRM-row steps (so the last split is the only short one).
struct RowsTnPlan {
  int64_t splits, rows_per_split;
};

inline RowsTnPlan plan_rows_tn(int64_t M, int64_t tiles, int64_t sms) {
  const int64_t splits = std::max<int64_t>(1, std::min(ceil_div(M, kRM), ceil_div(2 * sms, tiles)));
  const int64_t rows_per_split = ceil_div(ceil_div(M, splits), kRM) * kRM;
  return {ceil_div(M, rows_per_split), rows_per_split};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_tn_kernel(const RowsTnArgs args) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int lda = kRA + kPad, ldb = kRB + kPad, ldst = kRB + kStagePad;
  T* as = reinterpret_cast<T*>(smem);  // kRM x kRA rows of A
  T* bs = as + kRM * lda;               // kRM x kRB rows of B
  float* st = reinterpret_cast<float*>(smem + round_up(int64_t{kRM} * (lda + ldb) * sizeof(T), 128));
  constexpr int dt = DTypeOf<T>::value;
  const bool second = blockIdx.x >= args.tiles0;
  const RowsTnProduct& p = args.prod[second];
  const int64_t tile = blockIdx.x - (second ? args.tiles0 : 0), tiles_b = ceil_div(p.IB, kRB);
  const int64_t a0 = tile / tiles_b * kRA, b0 = tile % tiles_b * kRB;
  const int64_t split = blockIdx.y;
  const int64_t m_begin = split * args.rows_per_split;
  const int64_t m_end = std::min(args.M, m_begin + args.rows_per_split);
  const bool do_colsum = a0 == 0;
  Acc<T> acc[kFragsPerWarp];
  block_zero<T>(acc);
  float csum = 0.f;  // thread t < kRB: column b0 + t, rows in order
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kRM) {
    __syncthreads();
    load_tile(as, lda, p.a, dt, p.sa, m0, m_end, a0, p.IA, kRM, kRA);
    load_tile(bs, ldb, p.b, p.b_dt, p.sb, m0, m_end, b0, p.IB, kRM, kRB);
    __syncthreads();
    // The smem A tile (kRM x kRA) read column-major is the A^T operand (kRA x kRM).
    block_mma<T, true, false>(acc, 0, kRA / 16, kRB / 16, kRM / 16, as, lda, bs, ldb);
    if (do_colsum && threadIdx.x < kRB && b0 + threadIdx.x < p.IB) {
      // From global memory in B's own precision (an fp32 dy is not rounded); just loaded, so cached.
      const int64_t m_stop = std::min<int64_t>(m0 + kRM, m_end);
      for (int64_t m = m0; m < m_stop; ++m) csum += load1_dyn(p.b, p.b_dt, m * p.sb + b0 + threadIdx.x);
    }
  }
  block_store<T>(acc, 0, kRA / 16, kRB / 16, st, ldst);
  __syncthreads();
  float* out = p.part + split * args.split_stride;
  for (int i = threadIdx.x; i < kRA * kRB; i += kThreads) {
    const int r = i / kRB, c = i - r * kRB;
    if (a0 + r < p.IA && b0 + c < p.IB) out[(a0 + r) * p.IB + b0 + c] = st[r * ldst + c];
  }
  if (do_colsum && threadIdx.x < kRB && b0 + threadIdx.x < p.IB)
    p.colsum[split * args.cs_stride + b0 + threadIdx.x] = csum;
}

}  // namespace
}  // namespace adapter
}  // namespace compacter_kernels
