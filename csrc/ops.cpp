// Op schemas (device-independent) and the tiny Python module `compacter_kernels._C`.
// The CUDA kernels register their impls in their own .cu files; fake (meta) and autograd
// impls are registered from Python in compacter_kernels/_extension.py.
#include <cuda.h>  // CUDA_VERSION
#include <pybind11/pybind11.h>
#include <torch/library.h>

// Version strings arrive as bare tokens (-DCK_VERSION=0.1.0) and are stringified here, which
// avoids quoting "..." through setup.py -> ninja -> shell -> nvcc.
#define CK_STR_(x) #x
#define CK_STR(x) CK_STR_(x)
#ifndef CK_VERSION
#define CK_VERSION unknown
#endif
#ifndef CK_SOURCE_HASH
#define CK_SOURCE_HASH unknown
#endif
#ifndef CK_TORCH_VERSION
#define CK_TORCH_VERSION unknown
#endif

TORCH_LIBRARY(compacter_kernels, m) {
  // The fused adapter on dense H (impls in adapter.cu). activation: 0 gelu,
  // 1 gelu_tanh, 2 relu, 3 silu, 4 identity. store_z false: z is not written (an empty tensor).
  m.def("cuda_adapter_fwd(Tensor x, Tensor? residual, Tensor h_down, Tensor? bias_down, Tensor h_up, "
        "Tensor? bias_up, int activation, float scale, ScalarType out_dtype, bool store_z=True) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Backward in three launches: (dx, d residual, then each parameter's gradient in its dtype:
  // d rule_down, d left_down, d right_down, d bias_down, d rule_up, d left_up, d right_up,
  // d bias_up), empty tensors for absent ones. rule None: left is a dense weight (read for its
  // shape and dtype only). dx has no dy term when has_residual; d residual is then dy's copy.
  m.def("cuda_adapter_bwd(Tensor dy, Tensor x, Tensor z, Tensor h_down, Tensor h_up, Tensor? rule_down, "
        "Tensor left_down, Tensor? right_down, Tensor? bias_down, Tensor? rule_up, Tensor left_up, "
        "Tensor? right_up, Tensor? bias_up, int activation, float scale, bool has_residual, bool shared_rule) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Each projection's H in dtype, one launch (empty for a dense weight already in dtype).
  m.def("cuda_build_h(Tensor?[] rules, Tensor[] lefts, Tensor?[] rights, ScalarType dtype) -> Tensor[]",
        {at::Tag::pt2_compliant_tag});
  // (d rule, d left, d right) from a projection's fp32 dH, one launch (phm_linear's backward).
  m.def("cuda_phm_grads(Tensor dh, Tensor? rule, Tensor left, Tensor? right) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "compacter_kernels CUDA ops (registered under torch.ops.compacter_kernels)";
  m.def("build_info", [] {
    pybind11::dict d;
    d["version"] = CK_STR(CK_VERSION);
    d["source_hash"] = CK_STR(CK_SOURCE_HASH);
    d["torch_version"] = CK_STR(CK_TORCH_VERSION);
    d["cuda_version"] = CUDA_VERSION;  // e.g. 13000 for CUDA 13.0
    return d;
  });
}
