// CUDA impls of the fused adapter ops declared in ops.cpp, for dense H_down (d, k), H_up (k, d):
//   compacter_kernels::cuda_adapter_fwd -> (y, z)
//   compacter_kernels::cuda_adapter_bwd -> (dx, d residual, the parameters' gradients)
//   compacter_kernels::cuda_build_h, cuda_phm_grads: H from the factors, and the factors' gradients
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
  void rows_tn(int64_t gx, int64_t gy, const RowsTnArgs& p) {
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    rows_tn_kernel<T><<<grid, kThreads, rows_tn_smem_bytes<T>(), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void build_h(int64_t blocks, const BuildHArgs& a) {
    build_h_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void factor_grads(int64_t gx, int64_t gy, int64_t smem_bytes, const FactorGradArgs& a) {
    if (smem_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(factor_grads_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem_bytes)));
    }
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    factor_grads_kernel<<<grid, kGradThreads, smem_bytes, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

CudaLauncher launcher_for(const at::Tensor& t) {
  return CudaLauncher{static_cast<int>(t.get_device()), c10::cuda::getCurrentCUDAStream()};
}

std::tuple<at::Tensor, at::Tensor> cuda_adapter_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& h_down, const std::optional<at::Tensor>& bias_down,
                                                    const at::Tensor& h_up, const std::optional<at::Tensor>& bias_up,
                                                    int64_t activation, double scale, at::ScalarType out_dtype,
                                                    bool store_z) {
  CHECK_DEVICE(x);
  c10::cuda::CUDAGuard device_guard{x.device()};
  check_devices(x, {{"residual", opt(residual)}, {"h_down", &h_down}, {"bias_down", opt(bias_down)},
                    {"h_up", &h_up}, {"bias_up", opt(bias_up)}}, "cuda_adapter_fwd");
  CudaLauncher launch = launcher_for(x);
  return adapter_fwd(launch, x, residual, h_down, bias_down, h_up, bias_up, activation, scale, out_dtype, store_z);
}

AdapterGrads cuda_adapter_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& z, const at::Tensor& h_down,
                              const at::Tensor& h_up, const std::optional<at::Tensor>& rule_down,
                              const at::Tensor& left_down, const std::optional<at::Tensor>& right_down,
                              const std::optional<at::Tensor>& bias_down, const std::optional<at::Tensor>& rule_up,
                              const at::Tensor& left_up, const std::optional<at::Tensor>& right_up,
                              const std::optional<at::Tensor>& bias_up, int64_t activation, double scale,
                              bool has_residual, bool shared_rule) {
  CHECK_DEVICE(x);
  c10::cuda::CUDAGuard device_guard{x.device()};
  check_devices(x, {{"dy", &dy}, {"z", &z}, {"h_down", &h_down}, {"h_up", &h_up}, {"rule_down", opt(rule_down)},
                    {"left_down", &left_down}, {"right_down", opt(right_down)}, {"bias_down", opt(bias_down)},
                    {"rule_up", opt(rule_up)}, {"left_up", &left_up}, {"right_up", opt(right_up)},
                    {"bias_up", opt(bias_up)}}, "cuda_adapter_bwd");
  CudaLauncher launch = launcher_for(x);
  return adapter_bwd(launch, dy, x, z, h_down, h_up, rule_down, left_down, right_down, bias_down, rule_up, left_up,
                     right_up, bias_up, activation, scale, has_residual, shared_rule);
}

std::vector<at::Tensor> cuda_build_h(const c10::List<std::optional<at::Tensor>>& rules, at::TensorList lefts,
                                     const c10::List<std::optional<at::Tensor>>& rights, at::ScalarType dtype) {
  TORCH_CHECK(!lefts.empty(), "cuda_build_h: no projections");
  CHECK_DEVICE(lefts[0]);
  c10::cuda::CUDAGuard device_guard{lefts[0].device()};
  CudaLauncher launch = launcher_for(lefts[0]);
  return build_h(launch, rules, lefts, rights, dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_phm_grads(const at::Tensor& dh,
                                                              const std::optional<at::Tensor>& rule,
                                                              const at::Tensor& left,
                                                              const std::optional<at::Tensor>& right) {
  CHECK_DEVICE(dh);
  c10::cuda::CUDAGuard device_guard{dh.device()};
  check_devices(dh, {{"rule", opt(rule)}, {"left", &left}, {"right", opt(right)}}, "cuda_phm_grads");
  CudaLauncher launch = launcher_for(dh);
  return phm_grads(launch, dh, rule, left, right);
}

}  // namespace
}  // namespace adapter

TORCH_LIBRARY_IMPL(compacter_kernels, CUDA, m) {
  m.impl("cuda_adapter_fwd", &adapter::cuda_adapter_fwd);
  m.impl("cuda_adapter_bwd", &adapter::cuda_adapter_bwd);
  m.impl("cuda_build_h", &adapter::cuda_build_h);
  m.impl("cuda_phm_grads", &adapter::cuda_phm_grads);
}

}  // namespace compacter_kernels
