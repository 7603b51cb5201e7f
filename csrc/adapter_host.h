// Host side of the fused adapter ops, for any device: argument checks that do not depend on
// the device, output allocation, the kernels' arguments and the order of the launches.
// Two users:
//   - adapter.cu, the CUDA entry points: device checks, device guard and stream, then these
//     functions with a Launcher that launches the kernels on the GPU;
//   - tests/cuda_emulation/, which runs the same kernels on the CPU (std::threads for a block's
//     threads, WMMA emulated) through these same functions, so CI tests all of this but the
//     launches themselves without a GPU.
// A Launcher provides:
//   at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions&)    outputs the kernels write
//   int64_t sm_count()                                                   splits rows_tn's rows
//   int64_t max_smem()                  shared memory a block may opt in to (bytes): caps the layout
//   template <typename T> void fwd(int64_t blocks, const FwdArgs&)       adapter_fwd_kernel<T>
//   template <typename T> void bwd(int64_t blocks, const BwdArgs&)       adapter_bwd_kernel<T>
//   template <typename T> void rows_tn(int64_t gx, int64_t gy, int64_t gz, const RowsTnArgs&)
//   void sum_splits(int64_t blocks, const float* part, float* out, int64_t splits, int64_t n, float scale)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>  // per-operator headers: much lighter to compile than ATen/ATen.h
#include <ATen/ops/zeros.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "adapter_bwd.cuh"
#include "adapter_fwd.cuh"

namespace compacter_kernels {
namespace adapter {
namespace {

// The kernels' element types (x's dtype), as scalar_t inside the lambda.
#define CK_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)             \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// DType code of a tensor the kernels read or write in a dtype known only at run time.
inline int dtype_code(c10::ScalarType t, const char* what) {
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
inline at::Tensor rows_view(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

inline void check_kernel_dtype(const at::Tensor& x, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": x has dtype ", t,
              "; the kernels take float32, float16 or bfloat16");
}

inline void check_activation(int64_t activation, const char* op) {
  TORCH_CHECK(activation >= kGelu && activation <= kIdentity, op, ": activation code must be in 0..4 ",
              "(gelu, gelu_tanh, relu, silu, identity), got ", activation);
}

// Messages name the op, the argument, and the sizes expected and seen.
inline void check_shape(const at::Tensor& t, const char* name, c10::IntArrayRef expected, const char* op) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// H_down (d, k) and H_up (k, d): x's dtype, contiguous.
inline void check_h(const at::Tensor& h_down, const at::Tensor& h_up, const at::Tensor& x, int64_t d, int64_t k,
                    const char* op) {
  check_shape(h_down, "h_down", {d, k}, op);
  check_shape(h_up, "h_up", {k, d}, op);
  check_contiguous(h_down, "h_down", op);
  check_contiguous(h_up, "h_up", op);
  TORCH_CHECK(h_down.scalar_type() == x.scalar_type() && h_up.scalar_type() == x.scalar_type(), op,
              ": h_down and h_up must have x's dtype ", x.scalar_type(), ", got ", h_down.scalar_type(), " and ",
              h_up.scalar_type());
}

inline void check_bias(const std::optional<at::Tensor>& bias, const char* name, const at::Tensor& x, int64_t len,
                       const char* op) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 1 && b.size(0) == len, op, ": ", name, " must have shape (", len, "), got ", b.sizes());
  // float32 too: under autocast the biases stay fp32 parameters (the eager bias add is fp32).
  TORCH_CHECK(b.scalar_type() == x.scalar_type() || b.scalar_type() == at::kFloat, op, ": ", name,
              " must have x's dtype ", x.scalar_type(), " or float32, got ", b.scalar_type());
  check_contiguous(b, name, op);
}

inline int64_t checked_blocks(int64_t M, int BM, const char* op) {
  const int64_t blocks = ceil_div(M, BM);
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many rows (", M, ")");
  return blocks;
}

// The most bytes of rows (x forward, dy backward) a block keeps in shared memory: the
// COMPACTER_KERNELS_CUDA_RESIDENT_KIB environment variable, read on every call (an experiment
// knob: compare layouts in one process without rebuilding), else kDefaultResidentBytes.
inline int64_t resident_bytes_limit(const char* op) {
  const char* env = std::getenv("COMPACTER_KERNELS_CUDA_RESIDENT_KIB");
  if (env == nullptr || *env == '\0') return kDefaultResidentBytes;
  char* end = nullptr;
  errno = 0;
  const long long kib = std::strtoll(env, &end, 10);
  TORCH_CHECK(*end == '\0' && errno == 0 && kib >= 0 && kib <= 1024 * 1024, op,
              ": COMPACTER_KERNELS_CUDA_RESIDENT_KIB must be a whole number of KiB from 0 to 1048576, got '", env,
              "'");
  return static_cast<int64_t>(kib) * 1024;
}

// Rows kept on chip when wanted and within the limit, unless the layout would then need more
// shared memory than a block may have (a raised limit on a wide d): then they stream.
template <typename Launcher>
Layout choose_layout(Launcher& launch, int64_t d, int64_t k, int64_t esize, bool want_resident, const char* op) {
  Layout L = make_layout(d, k, esize, want_resident, resident_bytes_limit(op));
  if (L.resident && L.bytes > launch.max_smem()) L = make_layout(d, k, esize, false, 0);
  return L;
}

// ---- forward -----------------------------------------------------------------------------------

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> adapter_fwd(Launcher& launch, const at::Tensor& x_in,
                                               const std::optional<at::Tensor>& residual_in, const at::Tensor& h_down,
                                               const std::optional<at::Tensor>& bias_down, const at::Tensor& h_up,
                                               const std::optional<at::Tensor>& bias_up, int64_t activation,
                                               double scale, at::ScalarType out_dtype) {
  constexpr const char* op = "cuda_adapter_fwd";
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
  int residual_dt = kF32;
  if (residual_in.has_value()) {
    check_shape(*residual_in, "residual", {M, d}, op);
    residual_dt = dtype_code(residual_in->scalar_type(), "cuda_adapter_fwd: residual");
  }

  at::Tensor y = launch.empty({M, d}, x_in.options().dtype(out_dtype));
  at::Tensor z = launch.empty({M, k}, x_in.options());
  if (M == 0) return {y, z};
  const at::Tensor x = rows_view(x_in);
  at::Tensor residual;  // undefined: r = x
  if (residual_in.has_value()) residual = rows_view(*residual_in);

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
  args.L = choose_layout(launch, d, k, x.element_size(), /*want_resident=*/!residual.defined(), op);

  const int64_t blocks = checked_blocks(M, args.L.BM, op);
  CK_DISPATCH_KERNEL_TYPES(x.scalar_type(), "cuda_adapter_fwd", [&] { launch.template fwd<scalar_t>(blocks, args); });
  return {y, z};
}

// ---- backward ----------------------------------------------------------------------------------

// out[...] = scale * sum over the leading (split) dimension of part, in split order.
template <typename Launcher>
at::Tensor sum_splits(Launcher& launch, const at::Tensor& part, at::IntArrayRef shape, float scale) {
  at::Tensor out = launch.empty(shape, part.options());
  const int64_t n = out.numel(), splits = part.size(0);
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 4096);
  launch.sum_splits(blocks, part.data_ptr<float>(), out.data_ptr<float>(), splits, n, scale);
  return out;
}

// (scale * A^T @ B, scale * column sums of B) in fp32, for a (M, IA) of type T and b (M, IB)
// of any kernel dtype; both with unit column stride.
template <typename T, typename Launcher>
std::tuple<at::Tensor, at::Tensor> rows_tn(Launcher& launch, const at::Tensor& a, const at::Tensor& b, float scale) {
  const int64_t M = a.size(0), IA = a.size(1), IB = b.size(1);
  const RowsTnPlan plan = plan_rows_tn(M, IA, IB, launch.sm_count());
  TORCH_CHECK(plan.splits <= 65535 && ceil_div(IB, kRB) <= 65535, "cuda_adapter_bwd: grid too large");
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor part = launch.empty({plan.splits, IA, IB}, f32);
  at::Tensor csum = launch.empty({plan.splits, IB}, f32);
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
  launch.template rows_tn<T>(ceil_div(IA, kRA), ceil_div(IB, kRB), plan.splits, p);
  return {sum_splits(launch, part, {IA, IB}, scale), sum_splits(launch, csum, {IB}, scale)};
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bwd(
    Launcher& launch, const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& z, const at::Tensor& h_down,
    const at::Tensor& h_up, int64_t activation, double scale, bool has_residual) {
  constexpr const char* op = "cuda_adapter_bwd";
  check_kernel_dtype(x_in, op);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D (rows, d), got shape ", x_in.sizes());
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D (rows, k), got shape ", z.sizes());
  const int64_t M = x_in.size(0), d = x_in.size(1), k = z.size(1);
  TORCH_CHECK(d > 0 && k > 0, op, ": d and k must be positive, got d=", d, " k=", k);
  check_shape(dy_in, "dy", {M, d}, op);
  check_shape(z, "z", {M, k}, op);
  check_contiguous(z, "z", op);
  TORCH_CHECK(z.scalar_type() == x_in.scalar_type(), op, ": z must have x's dtype ", x_in.scalar_type(), ", got ",
              z.scalar_type());
  check_h(h_down, h_up, x_in, d, k, op);
  check_activation(activation, op);
  const int dy_dt = dtype_code(dy_in.scalar_type(), "cuda_adapter_bwd: dy");

  at::Tensor dx = launch.empty({M, d}, x_in.options());
  if (M == 0) {
    const auto f32 = x_in.options().dtype(at::kFloat);
    return {dx, at::zeros({d, k}, f32), at::zeros({k, d}, f32), at::zeros({k}, f32), at::zeros({d}, f32)};
  }
  const at::Tensor x = rows_view(x_in);
  const at::Tensor dy = rows_view(dy_in);
  const auto dtype = x.scalar_type();
  at::Tensor g = launch.empty({M, k}, x.options());
  at::Tensor dz = launch.empty({M, k}, x.options());

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
  args.L = choose_layout(launch, d, k, x.element_size(), /*want_resident=*/!has_residual && dy.scalar_type() == dtype,
                         op);

  const int64_t blocks = checked_blocks(M, args.L.BM, op);
  at::Tensor dH_down, db_down, dH_up, db_up;
  CK_DISPATCH_KERNEL_TYPES(dtype, "cuda_adapter_bwd", [&] {
    launch.template bwd<scalar_t>(blocks, args);
    std::tie(dH_down, db_down) = rows_tn<scalar_t>(launch, x, dz, 1.f);                   // x^T dz, sum dz
    std::tie(dH_up, db_up) = rows_tn<scalar_t>(launch, g, dy, static_cast<float>(scale));  // g^T dy, sum dy
  });
  return {dx, dH_down, dH_up, db_down, db_up};
}

}  // namespace
}  // namespace adapter
}  // namespace compacter_kernels
