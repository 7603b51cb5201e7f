// Pieces shared by the fused adapter kernels (adapter_fwd.cuh, adapter_bwd.cuh):
//   - dtype-generic 8-element global loads/stores (16-byte vectors when the address allows),
//   - a tile loader global -> shared memory with zero fill outside the matrix,
//   - the 16x16x16 warp tile product: WMMA (tensor cores) for fp16/bf16, exact FMA for fp32,
//   - a block GEMM pass over shared-memory operands, and the activations,
//   - the shared-memory layout of the per-row-block kernels (host and device).
// Every kernel runs kThreads = 128 threads (4 warps); see csrc/README.md for the design.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace compacter_kernels {
namespace adapter {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kFragsPerWarp = 4;  // 16x16 fp32 accumulator tiles a warp holds per pass
constexpr int kTilesPerPass = kWarps * kFragsPerWarp;
constexpr int kBD = 64;        // columns of d per chunk (forward/backward row-block kernels)
constexpr int kPad = 8;        // smem row padding in elements: rows stay 16-byte aligned
                               // (WMMA needs ldm % 8 == 0) and successive rows shift banks
constexpr int kStagePad = 4;   // the same for the fp32 staging buffers (ldm % 4 == 0)
// A row block keeps its whole rows of x (forward) or dy (backward) in shared memory when they
// take at most this many bytes (COMPACTER_KERNELS_CUDA_RESIDENT_KIB overrides it: see
// adapter_host.h), so that x is read from global memory once; else it streams kBD-column tiles
// and reads the residual again in the epilogue.
constexpr int64_t kDefaultResidentBytes = 64 * 1024;

// Runtime element types of the tensors whose dtype may differ from x's (residual, y, dy, biases).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr int value = kF32; };
template <> struct DTypeOf<c10::Half> { static constexpr int value = kF16; };
template <> struct DTypeOf<c10::BFloat16> { static constexpr int value = kBF16; };

__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- 8-element loads and stores ------------------------------------------------------------

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// v[j] = p[j] for j < n, 0 after (n in 0..8). One 16-byte load (two for fp32) when all 8 are
// wanted and p is 16-byte aligned: x may have any row stride, so alignment is checked per row.
template <typename T>
__device__ __forceinline__ void load8(const T* p, int n, float (&v)[8]) {
  if (n == 8 && aligned16(p)) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = static_cast<float>(e[j]);
      return;
    } else if constexpr (sizeof(T) == 4) {
      const float4 a = reinterpret_cast<const float4*>(p)[0];
      const float4 b = reinterpret_cast<const float4*>(p)[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = j < n ? static_cast<float>(p[j]) : 0.f;
}

// p[j] = v[j] for j < n (rounded to T); vector stores under the same conditions as load8.
template <typename T>
__device__ __forceinline__ void store8(T* p, int n, const float (&v)[8]) {
  if (n == 8 && aligned16(p)) {
    if constexpr (sizeof(T) == 2) {
      alignas(16) T e[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) e[j] = T(v[j]);
      *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(e);
      return;
    } else if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < n) p[j] = T(v[j]);
}

// The same for a tensor whose dtype is known only at run time (a uniform branch per call).
__device__ __forceinline__ void load8_dyn(const void* base, int dt, int64_t i, int n, float (&v)[8]) {
  switch (dt) {
    case kF16: load8(static_cast<const c10::Half*>(base) + i, n, v); break;
    case kBF16: load8(static_cast<const c10::BFloat16*>(base) + i, n, v); break;
    case kF64: load8(static_cast<const double*>(base) + i, n, v); break;
    default: load8(static_cast<const float*>(base) + i, n, v); break;
  }
}

__device__ __forceinline__ float load1_dyn(const void* base, int dt, int64_t i) {
  switch (dt) {
    case kF16: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    case kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    case kF64: return static_cast<float>(static_cast<const double*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store8_dyn(void* base, int dt, int64_t i, int n, const float (&v)[8]) {
  switch (dt) {
    case kF16: store8(static_cast<c10::Half*>(base) + i, n, v); break;
    case kBF16: store8(static_cast<c10::BFloat16*>(base) + i, n, v); break;
    case kF64: store8(static_cast<double*>(base) + i, n, v); break;
    default: store8(static_cast<float*>(base) + i, n, v); break;
  }
}

// Copies the rows x cols tile at (row0, col0) of a row-major global matrix (leading dimension
// ld, element type dt, nrows x ncols valid) into shared memory as T (leading dimension lds),
// zero outside the matrix: padded rows/columns then add nothing to the products.
// cols must be a multiple of 8; each thread moves 8 consecutive elements at a time, so a warp
// reads 32 consecutive 16-byte chunks of a row (coalesced).
template <typename T>
__device__ void load_tile(T* dst, int lds, const void* src, int dt, int64_t ld, int64_t row0, int64_t nrows,
                          int64_t col0, int64_t ncols, int rows, int cols) {
  const int chunks = cols / 8;
  for (int i = threadIdx.x; i < rows * chunks; i += blockDim.x) {
    const int r = i / chunks, c = (i - r * chunks) * 8;
    const int64_t gr = row0 + r, gc = col0 + c;
    const int n = gr < nrows ? static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, ncols - gc))) : 0;
    float v[8];
    if (n > 0) {
      load8_dyn(src, dt, gr * ld + gc, n, v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = 0.f;
    }
    store8(dst + r * lds + c, 8, v);
  }
}

// ---- activations (fp32; no fast math: GELU needs the exact erf) ------------------------------
// Codes in the order of compacter_kernels.reference.ACTIVATIONS.
enum Act : int { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3, kIdentity = 4 };

__device__ __forceinline__ float act_fwd(float z, int act) {
  switch (act) {
    case kGelu: return 0.5f * z * (1.f + erff(z * 0.7071067811865476f));
    case kGeluTanh: return 0.5f * z * (1.f + tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z)));
    case kRelu: return z > 0.f ? z : 0.f;
    case kSilu: return z / (1.f + expf(-z));
    default: return z;
  }
}

// act'(z)
__device__ __forceinline__ float act_bwd(float z, int act) {
  switch (act) {
    case kGelu: {
      const float cdf = 0.5f * (1.f + erff(z * 0.7071067811865476f));
      return cdf + z * 0.3989422804014327f * expf(-0.5f * z * z);
    }
    case kGeluTanh: {
      const float t = tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z));
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * 0.7978845608028654f * (1.f + 0.134145f * z * z);
    }
    case kRelu: return z > 0.f ? 1.f : 0.f;
    case kSilu: {
      const float s = 1.f / (1.f + expf(-z));
      return s * (1.f + z * (1.f - s));
    }
    default: return 1.f;
  }
}

// ---- the warp tile product: acc (16x16 fp32) += A (16x16) @ B (16x16), operands in smem ------
// A_COL / B_COL: the operand is stored column-major (element (i, j) at p[j * ld + i]), which is
// how the kernels read H^T and x^T without transposing anything in memory.

// fp16 / bf16: tensor cores through WMMA. The accumulator layout is opaque, so results go through
// an fp32 staging buffer in shared memory before any elementwise work.
template <typename T>
struct WmmaTile {
  using elem = std::conditional_t<std::is_same_v<T, c10::Half>, __half, __nv_bfloat16>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ void zero(Acc& c) { nvcuda::wmma::fill_fragment(c, 0.f); }
  template <bool A_COL, bool B_COL>
  static __device__ __forceinline__ void mma(Acc& c, const T* a, int lda, const T* b, int ldb) {
    namespace wmma = nvcuda::wmma;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      __trap();  // bf16 WMMA needs sm_80; the host refuses older GPUs before launching
      return;
    }
#endif
    using LA = std::conditional_t<A_COL, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<B_COL, wmma::col_major, wmma::row_major>;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, elem, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, elem, LB> fb;
    wmma::load_matrix_sync(fa, reinterpret_cast<const elem*>(a), lda);
    wmma::load_matrix_sync(fb, reinterpret_cast<const elem*>(b), ldb);
    wmma::mma_sync(c, fa, fb, c);
  }
  static __device__ __forceinline__ void store(float* p, int ldp, const Acc& c) {
    nvcuda::wmma::store_matrix_sync(p, c, ldp, nvcuda::wmma::mem_row_major);
  }
};

// fp32: plain FMAs on CUDA cores, exact fp32 (no TF32). Lane l owns row l/2, columns
// (l%2)*8 .. +8 of the warp's 16x16 tile.
struct SimtTile {
  struct Acc { float v[8]; };
  static __device__ __forceinline__ void zero(Acc& c) {
#pragma unroll
    for (int j = 0; j < 8; ++j) c.v[j] = 0.f;
  }
  template <bool A_COL, bool B_COL>
  static __device__ __forceinline__ void mma(Acc& c, const float* a, int lda, const float* b, int ldb) {
    const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
#pragma unroll 4
    for (int kk = 0; kk < 16; ++kk) {
      const float av = A_COL ? a[kk * lda + r] : a[r * lda + kk];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float bv = B_COL ? b[(c0 + j) * ldb + kk] : b[kk * ldb + c0 + j];
        c.v[j] = fmaf(av, bv, c.v[j]);
      }
    }
  }
  static __device__ __forceinline__ void store(float* p, int ldp, const Acc& c) {
    const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) p[r * ldp + c0 + j] = c.v[j];
  }
};

template <typename T>
using Tile = std::conditional_t<std::is_same_v<T, float>, SimtTile, WmmaTile<T>>;
template <typename T>
using Acc = typename Tile<T>::Acc;

// ---- block GEMM passes over shared-memory operands --------------------------------------------
// The output is FM x FN tiles of 16x16. Pass p gives warp w the tiles
//   t = p * kTilesPerPass + j * kWarps + w   (j < kFragsPerWarp, t < FM * FN),
// tile t = (t / FN, t % FN). With at most kTilesPerPass tiles (every shape the kernels choose
// for k <= 256) there is one pass and the accumulators live in registers across a whole loop.

template <typename T>
__device__ __forceinline__ void block_zero(Acc<T> (&acc)[kFragsPerWarp]) {
#pragma unroll
  for (int j = 0; j < kFragsPerWarp; ++j) Tile<T>::zero(acc[j]);
}

// acc[j] += sum_{s < KS} A(tm, s) @ B(s, tn), with A (FM*16 x KS*16) and B (KS*16 x FN*16).
template <typename T, bool A_COL, bool B_COL>
__device__ __forceinline__ void block_mma(Acc<T> (&acc)[kFragsPerWarp], int pass, int FM, int FN, int KS,
                                          const T* A, int lda, const T* B, int ldb) {
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kFragsPerWarp; ++j) {
    const int t = pass * kTilesPerPass + j * kWarps + warp;
    if (t < FM * FN) {
      const int tm = t / FN, tn = t - tm * FN;
      for (int s = 0; s < KS; ++s) {
        const T* a = A_COL ? A + (s * 16) * lda + tm * 16 : A + (tm * 16) * lda + s * 16;
        const T* b = B_COL ? B + (tn * 16) * ldb + s * 16 : B + (s * 16) * ldb + tn * 16;
        Tile<T>::template mma<A_COL, B_COL>(acc[j], a, lda, b, ldb);
      }
    }
  }
}

// The pass's tiles into a row-major fp32 buffer (leading dimension ldc).
template <typename T>
__device__ __forceinline__ void block_store(const Acc<T> (&acc)[kFragsPerWarp], int pass, int FM, int FN,
                                            float* C, int ldc) {
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kFragsPerWarp; ++j) {
    const int t = pass * kTilesPerPass + j * kWarps + warp;
    if (t < FM * FN) {
      const int tm = t / FN, tn = t - tm * FN;
      Tile<T>::store(C + (tm * 16) * ldc + tn * 16, ldc, acc[j]);
    }
  }
}

// ---- shared-memory layout of the row-block kernels (forward, and backward kernel 1) ----------
// rows:  BM x ldr   the row block's x (forward) / dy (backward): whole rows when resident,
//                    else one kBD-column tile
// h:     a tile of H: kBD x (KP+pad) of H_down, or KP x (kBD+pad) of H_up (the larger of the two)
// kbuf:  BM x (KP+pad)  g (forward) / dz (backward), the A operand of the second product
// stage: BM x (max(KP, kBD)+pad) fp32, the accumulators on their way to the epilogues
struct Layout {
  int BM, KP;                // rows per block, k padded to 16
  int ldr, ldh_dk, ldh_kd, ldk, ldst;
  bool resident;
  int64_t off_h, off_k, off_st, bytes;
};

inline Layout make_layout(int64_t d, int64_t k, int64_t esize, bool want_resident, int64_t resident_bytes) {
  Layout L{};
  L.KP = static_cast<int>(round_up(k, 16));
  // (BM/16) * (KP/16) accumulator tiles must fit one pass (kTilesPerPass) for k <= 256.
  L.BM = L.KP <= 128 ? 32 : 16;
  L.ldh_dk = L.KP + kPad;
  L.ldh_kd = kBD + kPad;
  L.ldk = L.KP + kPad;
  L.ldst = std::max(L.KP, kBD) + kStagePad;
  const int64_t resident_ld = round_up(d, kBD) + kPad;
  L.resident = want_resident && L.BM * resident_ld * esize <= resident_bytes;
  L.ldr = static_cast<int>(L.resident ? resident_ld : kBD + kPad);
  auto align = [](int64_t b) { return round_up(b, 128); };
  L.off_h = align(int64_t{L.BM} * L.ldr * esize);
  L.off_k = L.off_h + align(std::max<int64_t>(int64_t{kBD} * L.ldh_dk, int64_t{L.KP} * L.ldh_kd) * esize);
  L.off_st = L.off_k + align(int64_t{L.BM} * L.ldk * esize);
  L.bytes = L.off_st + align(int64_t{L.BM} * L.ldst * 4);
  return L;
}

}  // namespace adapter
}  // namespace compacter_kernels
