// CPU impls of the extension's CUDA ops that run csrc/'s kernels in the emulator
// (emulated_cuda.h): the adapter ops go through the same host code as the CUDA build
// (csrc/adapter_host.h) with a launcher that emulates the launches. Loaded by tests/emulation.py only when
// COMPACTER_KERNELS_EMULATE_CUDA=1, into a test process of its own: it registers CPU kernels
// for ops that otherwise have none.
#include "emulated_launcher.h"  // first: the CUDA names the kernels use

#include <torch/library.h>

#include <vector>


namespace compacter_kernels {
namespace adapter {
namespace {

std::tuple<at::Tensor, at::Tensor> emulated_adapter_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                        const at::Tensor& h_down,
                                                        const std::optional<at::Tensor>& bias_down,
                                                        const at::Tensor& h_up, const std::optional<at::Tensor>& bias_up,
                                                        int64_t activation, double scale, at::ScalarType out_dtype,
                                                        bool store_z) {
  EmulatedLauncher launch;
  return adapter_fwd(launch, x, residual, h_down, bias_down, h_up, bias_up, activation, scale, out_dtype, store_z);
}

AdapterGrads emulated_adapter_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& z,
                                  const at::Tensor& h_down, const at::Tensor& h_up,
                                  const std::optional<at::Tensor>& rule_down, const at::Tensor& left_down,
                                  const std::optional<at::Tensor>& right_down, const std::optional<at::Tensor>& bias_down,
                                  const std::optional<at::Tensor>& rule_up, const at::Tensor& left_up,
                                  const std::optional<at::Tensor>& right_up, const std::optional<at::Tensor>& bias_up,
                                  int64_t activation, double scale, bool has_residual, bool shared_rule) {
  EmulatedLauncher launch;
  return adapter_bwd(launch, dy, x, z, h_down, h_up, rule_down, left_down, right_down, bias_down, rule_up, left_up,
                     right_up, bias_up, activation, scale, has_residual, shared_rule);
}

std::vector<at::Tensor> emulated_build_h(const c10::List<std::optional<at::Tensor>>& rules, at::TensorList lefts,
                                         const c10::List<std::optional<at::Tensor>>& rights, at::ScalarType dtype) {
  EmulatedLauncher launch;
  return build_h(launch, rules, lefts, rights, dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_phm_grads(const at::Tensor& dh,
                                                                  const std::optional<at::Tensor>& rule,
                                                                  const at::Tensor& left,
                                                                  const std::optional<at::Tensor>& right) {
  EmulatedLauncher launch;
  return phm_grads(launch, dh, rule, left, right);
}

// Grids launched so far, by every emulated op.
int64_t launches() { return emulated_launches; }

// (resident, shared-memory bytes) of the last forward and backward launches.
std::vector<int64_t> last_layouts() {
  return {last_fwd_layout.resident, last_fwd_layout.bytes, last_bwd_layout.resident, last_bwd_layout.bytes};
}

}  // namespace
}  // namespace adapter

TORCH_LIBRARY(compacter_kernels_emulation, m) {
  m.def("last_layouts() -> int[]", &adapter::last_layouts);
  m.def("launches() -> int", &adapter::launches);
}

TORCH_LIBRARY_IMPL(compacter_kernels, CPU, m) {
  m.impl("cuda_adapter_fwd", &adapter::emulated_adapter_fwd);
  m.impl("cuda_adapter_bwd", &adapter::emulated_adapter_bwd);
  m.impl("cuda_build_h", &adapter::emulated_build_h);
  m.impl("cuda_phm_grads", &adapter::emulated_phm_grads);
}

}  // namespace compacter_kernels
