// Just enough of the CUDA programming model, on the CPU, to run csrc/'s kernels unchanged:
// each block's threads are std::threads meeting at a std::barrier for __syncthreads(), blocks
// run one after another over one shared-memory arena, and WMMA is emulated per its
// specification (every lane holds the whole 16x16 tile; the kernels never touch fragment
// elements, so the real lane layout does not matter). It checks what the real hardware would
// punish silently or with a fault: WMMA pointers 32-byte aligned and ldm a multiple of 8 (4 for
// fp32 stores), shared memory within the H100's opt-in limit, and, through NaN poison, that no
// kernel reads shared memory it did not write. What it cannot show: speed, warp-level timing
// races (a missing __syncthreads shows only as a wrong result, or under ThreadSanitizer), and
// the compiler's view of registers.
#pragma once

#include <vector_types.h>  // uint4, float4 (host-usable CUDA headers)
#define __launch_bounds__(...)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>

#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedDim3 threadIdx, blockIdx;
inline EmulatedDim3 blockDim, gridDim;
inline std::barrier<>* emulated_block_barrier = nullptr;
inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }
[[noreturn]] inline void __trap() { throw std::runtime_error("__trap() in an emulated kernel"); }

[[noreturn]] inline void emulation_violation(const char* what) {
  // A fault on the GPU: abort loudly rather than let a test pass.
  std::fprintf(stderr, "CUDA emulation: %s\n", what);
  std::abort();
}

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  float v[16][16];
};

inline float to_float(__half h) { return __half2float(h); }
inline float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }

template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emulation_violation("wmma::load_matrix_sync pointer not 32-byte aligned");
  if (ldm % 8 != 0) emulation_violation("wmma::load_matrix_sync ldm not a multiple of 8");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = to_float(std::is_same_v<L, row_major> ? p[i * ldm + j] : p[j * ldm + i]);
}

template <class T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float value) {
  for (auto& row : f.v)
    for (auto& e : row) e = value;
}

template <class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float t[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      t[i][j] = s;
    }
  std::memcpy(d.v, t, sizeof t);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emulation_violation("wmma::store_matrix_sync pointer not 32-byte aligned");
  if (ldm % 4 != 0) emulation_violation("wmma::store_matrix_sync ldm not a multiple of 4");
  if (threadIdx.x % 32 != 0) return;  // every lane holds the same tile: one writes it
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.v[i][j];
}
}  // namespace wmma
}  // namespace nvcuda

// Dynamic shared memory: the kernels' `extern __shared__ unsigned char smem[]` (declared at
// block scope in namespace compacter_kernels::adapter's anonymous namespace) names this array.
constexpr int64_t kEmulatedSmemLimit = 227 * 1024;  // H100 / H200 opt-in limit per block
namespace compacter_kernels {
namespace adapter {
namespace {
alignas(128) unsigned char smem[kEmulatedSmemLimit];
}  // namespace
}  // namespace adapter
}  // namespace compacter_kernels

// Runs body() as a grid of blocks of `threads` threads each, with `smem_bytes` of shared
// memory poisoned with 0xFF bytes (NaN in fp32, fp16 and bf16) before every block.
// One grid at a time, as on one stream: the grid, the block's barrier and shared memory are
// globals here, so two host threads launching at once would share them.
inline std::mutex emulated_launch_mutex;
inline int64_t emulated_launches = 0;  // grids launched so far (the tests' launch counter)

inline void emulate_launch(EmulatedDim3 grid, unsigned threads, int64_t smem_bytes, const std::function<void()>& body) {
  if (smem_bytes > kEmulatedSmemLimit) emulation_violation("shared memory over the H100's 227 KiB per block");
  const std::lock_guard<std::mutex> one_grid_at_a_time(emulated_launch_mutex);
  ++emulated_launches;
  gridDim = grid;
  blockDim = {threads, 1, 1};
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(compacter_kernels::adapter::smem, 0xFF, static_cast<size_t>(smem_bytes));
        std::barrier<> barrier(threads);
        emulated_block_barrier = &barrier;
        std::vector<std::thread> block;
        block.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          block.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            blockIdx = {bx, by, bz};
            body();
          });
        for (auto& th : block) th.join();
      }
}
