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
  m.def("phm_weight(Tensor rule, Tensor left, Tensor? right) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // The fused adapter on dense H (impls in adapter.cu). activation: 0 gelu,
  // 1 gelu_tanh, 2 relu, 3 silu, 4 identity. Backward returns (dx, dH_down, dH_up, db_down,
  // db_up), the last four in float32; dx has no dy term when has_residual.
  m.def("cuda_adapter_fwd(Tensor x, Tensor? residual, Tensor h_down, Tensor? bias_down, Tensor h_up, "
        "Tensor? bias_up, int activation, float scale, ScalarType out_dtype) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("cuda_adapter_bwd(Tensor dy, Tensor x, Tensor z, Tensor h_down, Tensor h_up, int activation, "
        "float scale, bool has_residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
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
