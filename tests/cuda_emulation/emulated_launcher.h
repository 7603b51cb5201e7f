// adapter_host.h's Launcher on the CPU emulator (emulated_cuda.h): what the emulated ops
// (emulated_ops.cpp) and the ThreadSanitizer race check (race_check.cpp) launch the kernels with.
#pragma once

#include "emulated_cuda.h"  // first: the CUDA names the kernels use

#include <ATen/ops/full.h>

#include <algorithm>
#include <cmath>

#include "adapter_host.h"

namespace compacter_kernels {
namespace adapter {
namespace {

// The layouts of the last forward and backward launches, for tests of the layout choice.
inline Layout last_fwd_layout{}, last_bwd_layout{};

// adapter_host.h's Launcher, on the emulator. Outputs start as NaN, so an element a kernel
// does not write fails the comparison with the reference.
struct EmulatedLauncher {
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::full(sizes, NAN, options); }
  int64_t sm_count() { return 132; }  // an H100's: rows_tn splits rows as it would there
  int64_t max_smem() { return kEmulatedSmemLimit; }

  static void check_smem(const Layout& L, int64_t k, const char* op) {
    // The message of CudaLauncher::set_smem on an H100.
    TORCH_CHECK(L.bytes <= kEmulatedSmemLimit, op, ": bottleneck k=", k, " needs ", L.bytes,
                " bytes of shared memory per block, more than this GPU's ", kEmulatedSmemLimit,
                "; use the triton or reference backend for this size");
  }

  template <typename T>
  void fwd(int64_t blocks, const FwdArgs& a) {
    check_smem(a.L, a.k, "cuda_adapter_fwd");
    last_fwd_layout = a.L;
    emulate_launch({static_cast<unsigned>(blocks), 1, 1}, kThreads, a.L.bytes, [&] { adapter_fwd_kernel<T>(a); });
  }

  template <typename T>
  void bwd(int64_t blocks, const BwdArgs& a) {
    check_smem(a.L, a.k, "cuda_adapter_bwd");
    last_bwd_layout = a.L;
    emulate_launch({static_cast<unsigned>(blocks), 1, 1}, kThreads, a.L.bytes, [&] { adapter_bwd_kernel<T>(a); });
  }

  template <typename T>
  void rows_tn(int64_t gx, int64_t gy, const RowsTnArgs& p) {
    emulate_launch({static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1}, kThreads, rows_tn_smem_bytes<T>(),
                   [&] { rows_tn_kernel<T>(p); });
  }

  void build_h(int64_t blocks, const BuildHArgs& a) {
    // At most 2 blocks of 64: the grid-stride loop runs more than once per thread at test sizes.
    emulate_launch({static_cast<unsigned>(std::min<int64_t>(blocks, 2)), 1, 1}, 64, 0, [&] { build_h_kernel(a); });
  }

  void factor_grads(int64_t gx, int64_t gy, int64_t smem_bytes, const FactorGradArgs& a) {
    emulate_launch({static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1}, kGradThreads, smem_bytes,
                   [&] { factor_grads_kernel(a); });
  }
};

}  // namespace
}  // namespace adapter
}  // namespace compacter_kernels
