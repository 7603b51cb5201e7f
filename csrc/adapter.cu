// CUDA impls of the fused adapter ops declared in ops.cpp, for dense H_down (d, k), H_up (k, d):
//   compacter_kernels::cuda_adapter_fwd -> (y, z)
//   compacter_kernels::cuda_adapter_bwd -> (dx, dH_down, dH_up, db_down, db_up)   (last four fp32)
// This file holds the entry points (argument checks, allocation, launches); the kernels are in
// adapter_fwd.cuh and adapter_bwd.cuh, the pieces they share in adapter_common.cuh, and the
// design notes in README.md. One translation unit on purpose: the torch headers dominate
// nvcc's time (parsed once per arch), so a second .cu would add about 45 s to every build.
// Kernel launches are all here, so the .cuh files hold device code only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>  // per-operator headers: much lighter to compile than ATen/ATen.h
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE
// headers of a full toolkit.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "adapter_bwd.cuh"
#include "adapter_fwd.cuh"
#include "checks.h"

namespace compacter_kernels {
namespace adapter {
namespace {

// The kernels' element types (x's dtype), as scalar_t inside the lambda.
#define CK_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)             \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// DType code of a tensor the kernels read or write in a dtype known only at run time.
int dtype_code(c10::ScalarType t, const char* what) {
  switch (t) {
    case c10::ScalarType::Float: return kF32;
    case c10::ScalarType::Half: return kF16;
    case c10::ScalarType::BFloat16: return kBF16;
    case c10::ScalarType::Double: return kF64;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t, " (float32, float16, bfloat16, float64)");
  }
  return kF32;
}

// 2-D (rows, features) with unit column stride: the kernels take any row stride.
at::Tensor rows_view(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void check_kernel_dtype(const at::Tensor& x, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": x has dtype ", t,
              "; the kernels take float32, float16 or bfloat16");
}

void check_activation(int64_t activation, const char* op) {
  TORCH_CHECK(activation >= kGelu && activation <= kIdentity, op, ": activation code must be in 0..4 ",
              "(gelu, gelu_tanh, relu, silu, identity), got ", activation);
}

// H_down (d, k) and H_up (k, d): on x's device, x's dtype, contiguous.
void check_h(const at::Tensor& h_down, const at::Tensor& h_up, const at::Tensor& x, int64_t d, int64_t k,
             const char* op) {
  CHECK_DEVICE(h_down);
  CHECK_DEVICE(h_up);
  CHECK_SAME_DEVICE(h_down, x);
  CHECK_SAME_DEVICE(h_up, x);
  CHECK_SHAPE(h_down, d, k);
  CHECK_SHAPE(h_up, k, d);
  CHECK_CONTIGUOUS(h_down);
  CHECK_CONTIGUOUS(h_up);
  TORCH_CHECK(h_down.scalar_type() == x.scalar_type() && h_up.scalar_type() == x.scalar_type(), op,
              ": h_down and h_up must have x's dtype ", x.scalar_type(), ", got ", h_down.scalar_type(), " and ",
              h_up.scalar_type());
}

void check_bias(const std::optional<at::Tensor>& bias, const char* name, const at::Tensor& x, int64_t len,
                const char* op) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.is_cuda() && b.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
              ", got ", b.device());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == len, op, ": ", name, " must have shape (", len, "), got ", b.sizes());
  // float32 too: under autocast the biases stay fp32 parameters (the eager bias add is fp32).
  TORCH_CHECK(b.scalar_type() == x.scalar_type() || b.scalar_type() == at::kFloat, op, ": ", name,
              " must have x's dtype ", x.scalar_type(), " or float32, got ", b.scalar_type());
  TORCH_CHECK(b.is_contiguous(), op, ": ", name, " must be contiguous");
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// bf16 tensor-core tiles need sm_80 (fp16 and fp32 run wherever the build has an image).
void check_arch(c10::ScalarType dtype, int device, const char* op) {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
  TORCH_CHECK(dtype != at::kBFloat16 || major >= 8, op,
              ": bfloat16 needs a GPU of compute capability 8.0 or newer, this one is ", major, ".x");
}

// Opts a row-block kernel in to more than 48 KiB of dynamic shared memory, or explains why it
// cannot run (only a very wide bottleneck gets there: the H tiles grow with k).
template <typename Kernel>
void set_smem(Kernel kernel, int64_t bytes, int device, int64_t k, const char* op) {
  const int limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  TORCH_CHECK(bytes <= limit, op, ": bottleneck k=", k, " needs ", bytes,
              " bytes of shared memory per block, more than this GPU's ", limit,
              "; use the triton or reference backend for this size");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// ---- forward -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> cuda_adapter_fwd(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                                                    const at::Tensor& h_down, const std::optional<at::Tensor>& bias_down,
                                                    const at::Tensor& h_up, const std::optional<at::Tensor>& bias_up,
                                                    int64_t activation, double scale, at::ScalarType out_dtype) {
  constexpr const char* op = "cuda_adapter_fwd";
  CHECK_DEVICE(x_in);
  check_kernel_dtype(x_in, op);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D (rows, d), got shape ", x_in.sizes());
  TORCH_CHECK(h_down.dim() == 2, op, ": h_down must be 2-D (d, k), got shape ", h_down.sizes());
  const int64_t M = x_in.size(0), d = x_in.size(1), k = h_down.size(1);
  TORCH_CHECK(d > 0 && k > 0, op, ": d and k must be positive, got d=", d, " k=", k);
  check_h(h_down, h_up, x_in, d, k, op);
  check_bias(bias_down, "bias_down", x_in, k, op);
  check_bias(bias_up, "bias_up", x_in, d, op);
  check_activation(activation, op);
  const int y_dt = dtype_code(out_dtype, "cuda_adapter_fwd: out_dtype");
  at::Tensor residual;  // undefined: r = x
  int residual_dt = kF32;
  if (residual_in.has_value()) {
    const at::Tensor& res = *residual_in;
    CHECK_DEVICE(res);
    CHECK_SAME_DEVICE(res, x_in);
    CHECK_SHAPE(res, M, d);
    residual_dt = dtype_code(res.scalar_type(), "cuda_adapter_fwd: residual");
  }

  c10::cuda::CUDAGuard device_guard{x_in.device()};
  auto y = at::empty({M, d}, x_in.options().dtype(out_dtype));
  auto z = at::empty({M, k}, x_in.options());
  if (M == 0) return {y, z};
  const at::Tensor x = rows_view(x_in);
  if (residual_in.has_value()) residual = rows_view(*residual_in);
  const int device = static_cast<int>(x.get_device());
  check_arch(x.scalar_type(), device, op);

  FwdArgs args{};
  args.x = x.data_ptr();
  args.residual = residual.defined() ? residual.data_ptr() : nullptr;
  args.h_down = h_down.data_ptr();
  args.b_down = bias_down.has_value() ? bias_down->data_ptr() : nullptr;
  args.h_up = h_up.data_ptr();
  args.b_up = bias_up.has_value() ? bias_up->data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.z = z.data_ptr();
  args.sx = x.stride(0);
  args.sr = residual.defined() ? residual.stride(0) : 0;
  args.M = M;
  args.d = d;
  args.k = k;
  args.residual_dt = residual_dt;
  args.b_down_dt = bias_down.has_value() ? dtype_code(bias_down->scalar_type(), op) : kF32;
  args.b_up_dt = bias_up.has_value() ? dtype_code(bias_up->scalar_type(), op) : kF32;
  args.y_dt = y_dt;
  args.act = static_cast<int>(activation);
  args.scale = static_cast<float>(scale);
  // x is needed again (as the residual) only when no residual tensor was given.
  args.L = make_layout(d, k, x.element_size(), /*want_resident=*/!residual.defined());

  const int64_t blocks = ceil_div(M, args.L.BM);
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many rows (", M, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CK_DISPATCH_KERNEL_TYPES(x.scalar_type(), "cuda_adapter_fwd", [&] {
    set_smem(adapter_fwd_kernel<scalar_t>, args.L.bytes, device, k, op);
    adapter_fwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, args.L.bytes, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, z};
}

// ---- backward ----------------------------------------------------------------------------------

// out[...] = scale * sum over the leading (split) dimension of part, in split order.
at::Tensor sum_splits(const at::Tensor& part, at::IntArrayRef shape, float scale, cudaStream_t stream) {
  auto out = at::empty(shape, part.options());
  const int64_t n = out.numel(), splits = part.size(0);
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 4096);
  sum_splits_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part.data_ptr<float>(), out.data_ptr<float>(),
                                                                         splits, n, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// (scale * A^T @ B, scale * column sums of B) in fp32, for a (M, IA) of type T and b (M, IB)
// of any kernel dtype; both with unit column stride.
template <typename T>
std::tuple<at::Tensor, at::Tensor> rows_tn(const at::Tensor& a, const at::Tensor& b, float scale, int device,
                                           cudaStream_t stream) {
  const int64_t M = a.size(0), IA = a.size(1), IB = b.size(1);
  const RowsTnPlan plan = plan_rows_tn(M, IA, IB, device_attribute(cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK(plan.splits <= 65535 && ceil_div(IB, kRB) <= 65535, "cuda_adapter_bwd: grid too large");
  const auto f32 = a.options().dtype(at::kFloat);
  auto part = at::empty({plan.splits, IA, IB}, f32);
  auto csum = at::empty({plan.splits, IB}, f32);
  RowsTnArgs p{};
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.part = part.data_ptr<float>();
  p.colsum = csum.data_ptr<float>();
  p.sa = a.stride(0);
  p.sb = b.stride(0);
  p.M = M;
  p.IA = IA;
  p.IB = IB;
  p.rows_per_split = plan.rows_per_split;
  p.b_dt = dtype_code(b.scalar_type(), "cuda_adapter_bwd");
  const dim3 grid(static_cast<unsigned>(ceil_div(IA, kRA)), static_cast<unsigned>(ceil_div(IB, kRB)),
                  static_cast<unsigned>(plan.splits));
  rows_tn_kernel<T><<<grid, kThreads, rows_tn_smem_bytes<T>(), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum_splits(part, {IA, IB}, scale, stream), sum_splits(csum, {IB}, scale, stream)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_adapter_bwd(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& z, const at::Tensor& h_down,
    const at::Tensor& h_up, int64_t activation, double scale, bool has_residual) {
  constexpr const char* op = "cuda_adapter_bwd";
  CHECK_DEVICE(x_in);
  CHECK_DEVICE(dy_in);
  CHECK_DEVICE(z);
  CHECK_SAME_DEVICE(dy_in, x_in);
  CHECK_SAME_DEVICE(z, x_in);
  check_kernel_dtype(x_in, op);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D (rows, d), got shape ", x_in.sizes());
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D (rows, k), got shape ", z.sizes());
  const int64_t M = x_in.size(0), d = x_in.size(1), k = z.size(1);
  TORCH_CHECK(d > 0 && k > 0, op, ": d and k must be positive, got d=", d, " k=", k);
  CHECK_SHAPE(dy_in, M, d);
  CHECK_SHAPE(z, M, k);
  CHECK_CONTIGUOUS(z);
  TORCH_CHECK(z.scalar_type() == x_in.scalar_type(), op, ": z must have x's dtype ", x_in.scalar_type(), ", got ",
              z.scalar_type());
  check_h(h_down, h_up, x_in, d, k, op);
  check_activation(activation, op);
  const int dy_dt = dtype_code(dy_in.scalar_type(), "cuda_adapter_bwd: dy");

  c10::cuda::CUDAGuard device_guard{x_in.device()};
  auto dx = at::empty({M, d}, x_in.options());
  if (M == 0) {
    const auto f32 = x_in.options().dtype(at::kFloat);
    return {dx, at::zeros({d, k}, f32), at::zeros({k, d}, f32), at::zeros({k}, f32), at::zeros({d}, f32)};
  }
  const at::Tensor x = rows_view(x_in);
  const at::Tensor dy = rows_view(dy_in);
  const auto dtype = x.scalar_type();
  const int device = static_cast<int>(x.get_device());
  check_arch(dtype, device, op);
  auto g = at::empty({M, k}, x.options());
  auto dz = at::empty({M, k}, x.options());

  BwdArgs args{};
  args.dy = dy.data_ptr();
  args.z = z.data_ptr();
  args.h_down = h_down.data_ptr();
  args.h_up = h_up.data_ptr();
  args.dx = dx.data_ptr();
  args.g = g.data_ptr();
  args.dz = dz.data_ptr();
  args.sdy = dy.stride(0);
  args.M = M;
  args.d = d;
  args.k = k;
  args.dy_dt = dy_dt;
  args.act = static_cast<int>(activation);
  args.scale = static_cast<float>(scale);
  args.has_residual = has_residual;
  // dy is needed again (dx's dy term) only without a residual tensor, and is kept in shared
  // memory, in x's dtype, only when it has that dtype: an fp32 dy is read again instead.
  args.L = make_layout(d, k, x.element_size(), /*want_resident=*/!has_residual && dy.scalar_type() == dtype);

  const int64_t blocks = ceil_div(M, args.L.BM);
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many rows (", M, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dH_down, db_down, dH_up, db_up;
  CK_DISPATCH_KERNEL_TYPES(dtype, "cuda_adapter_bwd", [&] {
    set_smem(adapter_bwd_kernel<scalar_t>, args.L.bytes, device, k, op);
    adapter_bwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, args.L.bytes, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    std::tie(dH_down, db_down) = rows_tn<scalar_t>(x, dz, 1.f, device, stream);                   // x^T dz, sum dz
    std::tie(dH_up, db_up) = rows_tn<scalar_t>(g, dy, static_cast<float>(scale), device, stream);  // g^T dy, sum dy
  });
  return {dx, dH_down, dH_up, db_down, db_up};
}

}  // namespace
}  // namespace adapter

TORCH_LIBRARY_IMPL(compacter_kernels, CUDA, m) {
  m.impl("cuda_adapter_fwd", &adapter::cuda_adapter_fwd);
  m.impl("cuda_adapter_bwd", &adapter::cuda_adapter_bwd);
}

}  // namespace compacter_kernels
