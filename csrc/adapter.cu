// CUDA impls of the fused adapter ops declared in ops.cpp, for dense H_down (d, k), H_up (k, d):
//   compacter_kernels::cuda_adapter_fwd -> (y, z)
//   compacter_kernels::cuda_adapter_bwd -> (dx, dH_down, dH_up, db_down, db_up)   (last four fp32)
// This file holds what is CUDA-specific about the entry points: device checks, the device
// guard and stream, shared-memory opt-in, and the launches. The rest of the host side (checks,
// allocation, kernel arguments, launch order) is in adapter_host.h, which the CPU emulation in
// tests/cuda_emulation/ shares; the kernels are in adapter_fwd.cuh / adapter_bwd.cuh, the
// pieces they share in adapter_common.cuh, and the design notes in README.md. One translation
// unit on purpose: the torch headers dominate nvcc's time (parsed once per arch), so a second
// .cu would add about 45 s to every build.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE
// headers of a full toolkit.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adapter_host.h"
#include "checks.h"

namespace compacter_kernels {
namespace adapter {
namespace {

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Every other tensor argument (nullptr: an absent optional) on x's CUDA device, and a GPU that
// can run the kernels for x's dtype.
void check_devices(const at::Tensor& x, std::initializer_list<std::pair<const char*, const at::Tensor*>> others,
                   const char* op) {
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t == nullptr || t->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
                ", got ", t->device());
  }
  // bf16 tensor-core tiles need sm_80 (fp16 and fp32 run wherever the build has an image).
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, x.get_device());
  TORCH_CHECK(x.scalar_type() != at::kBFloat16 || major >= 8, op,
              ": bfloat16 needs a GPU of compute capability 8.0 or newer, this one is ", major, ".x");
}

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// Launches on the current stream of x's device (adapter_host.h's Launcher).
struct CudaLauncher {
  int device;
  cudaStream_t stream;

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }
  int64_t sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount, device); }
  int64_t max_smem() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device); }

  // Opts a row-block kernel in to more than 48 KiB of dynamic shared memory, or explains why
  // it cannot run (only a very wide bottleneck gets there: the H tiles grow with k).
  template <typename Kernel>
  void set_smem(Kernel kernel, const Layout& L, int64_t k, const char* op) {
    const int64_t limit = max_smem();
    TORCH_CHECK(L.bytes <= limit, op, ": bottleneck k=", k, " needs ", L.bytes,
                " bytes of shared memory per block, more than this GPU's ", limit,
                "; use the triton or reference backend for this size");
    if (L.bytes > 48 * 1024) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L.bytes)));
    }
  }

  template <typename T>
  void fwd(int64_t blocks, const FwdArgs& a) {
    set_smem(adapter_fwd_kernel<T>, a.L, a.k, "cuda_adapter_fwd");
    adapter_fwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, a.L.bytes, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  void bwd(int64_t blocks, const BwdArgs& a) {
    set_smem(adapter_bwd_kernel<T>, a.L, a.k, "cuda_adapter_bwd");
    adapter_bwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, a.L.bytes, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  void rows_tn(int64_t gx, int64_t gy, int64_t gz, const RowsTnArgs& p) {
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
    rows_tn_kernel<T><<<grid, kThreads, rows_tn_smem_bytes<T>(), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void sum_splits(int64_t blocks, const float* part, float* out, int64_t splits, int64_t n, float scale) {
    sum_splits_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, out, splits, n, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> cuda_adapter_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& h_down, const std::optional<at::Tensor>& bias_down,
                                                    const at::Tensor& h_up, const std::optional<at::Tensor>& bias_up,
                                                    int64_t activation, double scale, at::ScalarType out_dtype) {
  CHECK_DEVICE(x);
  c10::cuda::CUDAGuard device_guard{x.device()};
  check_devices(x, {{"residual", opt(residual)}, {"h_down", &h_down}, {"bias_down", opt(bias_down)},
                    {"h_up", &h_up}, {"bias_up", opt(bias_up)}}, "cuda_adapter_fwd");
  CudaLauncher launch{static_cast<int>(x.get_device()), c10::cuda::getCurrentCUDAStream()};
  return adapter_fwd(launch, x, residual, h_down, bias_down, h_up, bias_up, activation, scale, out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_adapter_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& z, const at::Tensor& h_down, const at::Tensor& h_up,
    int64_t activation, double scale, bool has_residual) {
  CHECK_DEVICE(x);
  c10::cuda::CUDAGuard device_guard{x.device()};
  check_devices(x, {{"dy", &dy}, {"z", &z}, {"h_down", &h_down}, {"h_up", &h_up}}, "cuda_adapter_bwd");
  CudaLauncher launch{static_cast<int>(x.get_device()), c10::cuda::getCurrentCUDAStream()};
  return adapter_bwd(launch, dy, x, z, h_down, h_up, activation, scale, has_residual);
}

}  // namespace
}  // namespace adapter

TORCH_LIBRARY_IMPL(compacter_kernels, CUDA, m) {
  m.impl("cuda_adapter_fwd", &adapter::cuda_adapter_fwd);
  m.impl("cuda_adapter_bwd", &adapter::cuda_adapter_bwd);
}

}  // namespace compacter_kernels
