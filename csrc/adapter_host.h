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
//   template <typename T> void rows_tn(int64_t gx, int64_t gy, const RowsTnArgs&)
//   void build_h(int64_t blocks, const BuildHArgs&)                     build_h_kernel, 256 threads
//   void factor_grads(int64_t gx, int64_t gy, int64_t smem, const FactorGradArgs&)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>  // per-operator headers: much lighter to compile than ATen/ATen.h
#include <ATen/core/List.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <vector>

#include "adapter_bwd.cuh"
#include "adapter_factors.cuh"
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
                                               double scale, at::ScalarType out_dtype, bool store_z = true) {
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
  at::Tensor z = launch.empty(store_z ? std::vector<int64_t>{M, k} : std::vector<int64_t>{0}, x_in.options());
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
  args.z = store_z ? z.data_ptr() : nullptr;  // store_z false: inference, z not written
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

// ---- the factors: H built from them, and their gradients ---------------------------------------

// A projection's factors as the kernels take them, checked: a PHM projection (rule (n, n, n),
// left S (n, I/n, R) or B (n, I/n, O/n), right T (n, R, O/n) or none) or, without a rule, a
// dense (I, O) matrix in left; any float dtype, contiguous. I and O < 0: taken from the factors.
inline Factors factors_of(const std::optional<at::Tensor>& rule, const at::Tensor& left,
                          const std::optional<at::Tensor>& right, int64_t I, int64_t O, const char* what,
                          const char* op) {
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_contiguous(), op, ": ", what, " ", name, " must be contiguous");
    TORCH_CHECK(t.device() == left.device(), op, ": ", what, " ", name, " must be on left's device");
    return dtype_code(t.scalar_type(), op);
  };
  Factors f;
  f.left = left.data_ptr();
  f.left_dt = check(left, "left");
  if (!rule.has_value()) {
    TORCH_CHECK(!right.has_value(), op, ": ", what, " has a right factor but no rule");
    TORCH_CHECK(left.dim() == 2 && (I < 0 || left.size(0) == I) && (O < 0 || left.size(1) == O), op, ": ", what,
                " weight must have shape (", I, ", ", O, "), got ", left.sizes());
    f.n = 1;
    f.P = left.size(0);
    f.Q = left.size(1);
    return f;
  }
  f.rule = rule->data_ptr();
  f.rule_dt = check(*rule, "rule");
  f.n = rule->size(0);
  TORCH_CHECK(rule->dim() == 3 && f.n > 0 && rule->size(1) == f.n && rule->size(2) == f.n, op, ": ", what,
              " rule must have shape (n, n, n), got ", rule->sizes());
  TORCH_CHECK(left.dim() == 3 && left.size(0) == f.n, op, ": ", what, " left must be (n, I/n, .), got ",
              left.sizes());
  f.P = left.size(1);
  if (right.has_value()) {
    f.right = right->data_ptr();
    f.right_dt = check(*right, "right");
    f.R = left.size(2);
    TORCH_CHECK(right->dim() == 3 && right->size(0) == f.n && right->size(1) == f.R, op, ": ", what,
                " right must have shape (", f.n, ", ", f.R, ", O/n), got ", right->sizes());
    f.Q = right->size(2);
  } else {
    f.Q = left.size(2);
  }
  TORCH_CHECK((I < 0 || f.n * f.P == I) && (O < 0 || f.n * f.Q == O), op, ": ", what, " factors make an H of (",
              f.n * f.P, ", ", f.n * f.Q, "), expected (", I, ", ", O, ")");
  return f;
}

inline std::optional<at::Tensor> item(const c10::List<std::optional<at::Tensor>>& list, size_t i) {
  return list.get(i);
}

// Each projection's H (I, O) in dtype, in one launch: summed in fp32 from a PHM projection's
// factors and rounded once, or a dense matrix of another dtype converted; an empty tensor for a
// dense matrix already in dtype (the kernels read it as it is).
template <typename Launcher>
std::vector<at::Tensor> build_h(Launcher& launch, const c10::List<std::optional<at::Tensor>>& rules,
                                at::TensorList lefts, const c10::List<std::optional<at::Tensor>>& rights,
                                at::ScalarType dtype) {
  constexpr const char* op = "cuda_build_h";
  const size_t count = lefts.size();
  TORCH_CHECK(count >= 1 && count <= 2 && rules.size() == count && rights.size() == count, op,
              ": one or two projections, as equally long lists of rules, lefts and rights");
  BuildHArgs args{};
  args.out_dt = dtype_code(dtype, op);
  std::vector<at::Tensor> out;
  int64_t total = 0;
  for (size_t w = 0; w < count; ++w) {
    args.f[w] = factors_of(item(rules, w), lefts[w], item(rights, w), -1, -1, w ? "second" : "first", op);
    const Factors& f = args.f[w];
    const bool build = f.rule != nullptr || lefts[w].scalar_type() != dtype;
    const std::vector<int64_t> shape = build ? std::vector<int64_t>{f.n * f.P, f.n * f.Q} : std::vector<int64_t>{0};
    out.push_back(launch.empty(shape, lefts[w].options().dtype(dtype)));
    args.out[w] = build ? out.back().data_ptr() : nullptr;
    total += build ? out.back().numel() : 0;
  }
  if (total > 0) launch.build_h(std::min<int64_t>(ceil_div(total, 256), int64_t{1} << 16), args);
  return out;
}

// What factor_grads_kernel needs of one projection's gradient outputs; chunk sizes filled in.
inline ProjGrads proj_grads(const Factors& f, const float* part, int64_t s_row, float scale, at::Tensor* drule,
                            const at::Tensor& dleft, const at::Tensor* dright) {
  ProjGrads g;
  g.f = f;
  g.part = part;
  g.s_row = s_row;
  g.scale = scale;
  g.drule = drule ? drule->data_ptr() : nullptr;
  g.dleft = dleft.data_ptr();
  g.dright = dright ? dright->data_ptr() : nullptr;
  // A PHM slice at kGradChunk elements a pass; a dense matrix in blocks of about 4096.
  g.chunk_rows = std::max<int64_t>(1, std::min<int64_t>(f.P, (f.rule ? kGradChunk : 4096) / std::max<int64_t>(1, f.Q)));
  return g;
}

template <typename Launcher>
void launch_factor_grads(Launcher& launch, FactorGradArgs& a, const char* op) {
  int64_t gx = 1, gy = 1;
  for (const ProjGrads& g : a.g) {
    if (g.f.n == 0) continue;
    gx = std::max(gx, g.f.n);
    if (g.f.rule == nullptr) {
      gy = std::max(gy, ceil_div(g.f.P, g.chunk_rows));
    } else {
      a.nn = std::max(a.nn, g.f.n * g.f.n);
      a.chunk = std::max(a.chunk, g.chunk_rows * g.f.Q);
      a.dt_len = std::max(a.dt_len, g.f.R * g.f.Q);
    }
  }
  TORCH_CHECK(gx <= INT32_MAX && gy <= 65535, op, ": too many factor-gradient blocks");
  const int64_t bytes = factor_grads_smem_bytes(a), limit = launch.max_smem();
  TORCH_CHECK(bytes <= limit, op, ": the factor gradients need ", bytes, " bytes of shared memory per block, more ",
              "than this GPU's ", limit, " (rank times O/n too large); use the triton or reference backend");
  launch.factor_grads(gx, gy, bytes, a);
}

// A gradient output shaped as its parameter (contiguous: the parameters are checked to be), or
// an empty placeholder for an absent or unwanted one (outputs may not alias).
template <typename Launcher>
at::Tensor grad_like(Launcher& launch, const std::optional<at::Tensor>& t, const at::Tensor& x, bool wanted = true) {
  return t.has_value() && wanted ? launch.empty(t->sizes(), t->options()) : at::empty({0}, x.options());
}

// (d rule, d left, d right) of H = sum_i kron(A_i, S_i T_i) (or of a dense H: (empty, dH, empty))
// from dH (I, O) fp32: phm_linear's backward, one launch.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> phm_grads(Launcher& launch, const at::Tensor& dh,
                                                         const std::optional<at::Tensor>& rule, const at::Tensor& left,
                                                         const std::optional<at::Tensor>& right) {
  constexpr const char* op = "cuda_phm_grads";
  TORCH_CHECK(dh.dim() == 2 && dh.scalar_type() == at::kFloat && dh.is_contiguous(), op,
              ": dh must be a contiguous 2-D float32 tensor, got ", dh.sizes(), " ", dh.scalar_type());
  const Factors f = factors_of(rule, left, right, dh.size(0), dh.size(1), "projection", op);
  at::Tensor drule = grad_like(launch, rule, dh), dleft = grad_like(launch, left, dh);
  at::Tensor dright = grad_like(launch, right, dh);
  if (dh.numel() == 0) return {drule.zero_(), dleft.zero_(), dright.zero_()};
  FactorGradArgs a;
  a.g[0] = proj_grads(f, dh.data_ptr<float>(), dh.size(1), 1.f, rule ? &drule : nullptr, dleft,
                      right ? &dright : nullptr);
  a.splits = 1;
  a.split_stride = dh.numel();
  launch_factor_grads(launch, a, op);
  return {drule, dleft, dright};
}

// ---- backward ----------------------------------------------------------------------------------

using AdapterGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor>;

// (dx, d residual, d rule_down, d left_down, d right_down, d bias_down, d rule_up, d left_up,
// d right_up, d bias_up) in three launches; each gradient in its parameter's dtype, an empty
// tensor for an absent parameter (and for d rule_up with shared_rule: the rule's whole gradient
// is d rule_down). h_down / h_up: the H's the forward ran on (x's dtype); a dense projection's
// left is only read for its shape and dtype. d residual (with has_residual) is a copy of dy.
template <typename Launcher>
AdapterGrads adapter_bwd(Launcher& launch, const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& z,
                         const at::Tensor& h_down, const at::Tensor& h_up, const std::optional<at::Tensor>& rule_down,
                         const at::Tensor& left_down, const std::optional<at::Tensor>& right_down,
                         const std::optional<at::Tensor>& bias_down, const std::optional<at::Tensor>& rule_up,
                         const at::Tensor& left_up, const std::optional<at::Tensor>& right_up,
                         const std::optional<at::Tensor>& bias_up, int64_t activation, double scale, bool has_residual,
                         bool shared_rule) {
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
  TORCH_CHECK(!shared_rule || (rule_down.has_value() && rule_up.has_value()), op,
              ": shared_rule needs both rules");
  const int dy_dt = dtype_code(dy_in.scalar_type(), "cuda_adapter_bwd: dy");
  const Factors fd = factors_of(rule_down, left_down, right_down, d, k, "down", op);
  const Factors fu = factors_of(rule_up, left_up, right_up, k, d, "up", op);
  // The biases give their gradients' shapes and dtypes only.
  for (const auto& [b, name, len] : {std::tuple{&bias_down, "bias_down", k}, std::tuple{&bias_up, "bias_up", d}}) {
    if (!b->has_value()) continue;
    TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == len, op, ": ", name, " must have shape (", len, "), got ",
                (*b)->sizes());
    dtype_code((*b)->scalar_type(), op);
  }

  at::Tensor dx = launch.empty({M, d}, x_in.options());
  at::Tensor dres = launch.empty(has_residual ? std::vector<int64_t>{M, d} : std::vector<int64_t>{0}, dy_in.options());
  at::Tensor g_rd = grad_like(launch, rule_down, x_in), g_ld = grad_like(launch, left_down, x_in);
  at::Tensor g_rgd = grad_like(launch, right_down, x_in), g_bd = grad_like(launch, bias_down, x_in);
  at::Tensor g_ru = grad_like(launch, rule_up, x_in, !shared_rule), g_lu = grad_like(launch, left_up, x_in);
  at::Tensor g_rgu = grad_like(launch, right_up, x_in), g_bu = grad_like(launch, bias_up, x_in);
  if (M == 0) {
    for (at::Tensor* t : {&g_rd, &g_ld, &g_rgd, &g_bd, &g_ru, &g_lu, &g_rgu, &g_bu}) t->zero_();
    return {dx, dres, g_rd, g_ld, g_rgd, g_bd, g_ru, g_lu, g_rgu, g_bu};
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
  args.dres = has_residual ? dres.data_ptr() : nullptr;
  args.sdy = dy.stride(0);
  args.M = M;
  args.d = d;
  args.k = k;
  args.dy_dt = dy_dt;
  args.dy_es = static_cast<int>(dy.element_size());
  args.act = static_cast<int>(activation);
  args.scale = static_cast<float>(scale);
  args.has_residual = has_residual;
  // dy is needed again (dx's dy term) only without a residual tensor, and is kept in shared
  // memory, in x's dtype, only when it has that dtype: an fp32 dy is read again instead.
  args.L = choose_layout(launch, d, k, x.element_size(), /*want_resident=*/!has_residual && dy.scalar_type() == dtype,
                         op);
  const int64_t blocks = checked_blocks(M, args.L.BM, op);

  // Kernel 2's two products: dH_down = x^T dz (d, k) with sum dz; dH_up = g^T dy (k, d) with sum dy.
  const int64_t tiles0 = rows_tn_tiles(d, k), tiles = tiles0 + rows_tn_tiles(k, d);
  const RowsTnPlan plan = plan_rows_tn(M, tiles, launch.sm_count());
  TORCH_CHECK(plan.splits <= 65535 && tiles <= INT32_MAX, op, ": grid too large");
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor part = launch.empty({plan.splits, 2 * d * k}, f32);
  at::Tensor csum = launch.empty({plan.splits, k + d}, f32);
  RowsTnArgs p{};
  p.prod[0] = {x.data_ptr(), dz.data_ptr(), part.data_ptr<float>(), csum.data_ptr<float>(), x.stride(0), k, d, k,
               dtype_code(dtype, op)};
  p.prod[1] = {g.data_ptr(), dy.data_ptr(), part.data_ptr<float>() + d * k, csum.data_ptr<float>() + k, k, dy.stride(0),
               k, d, dy_dt};
  p.tiles0 = tiles0;
  p.M = M;
  p.rows_per_split = plan.rows_per_split;
  p.split_stride = 2 * d * k;
  p.cs_stride = k + d;

  // Kernel 3: every parameter gradient from the partials.
  FactorGradArgs fg;
  fg.g[0] = proj_grads(fd, part.data_ptr<float>(), k, 1.f, rule_down ? &g_rd : nullptr, g_ld,
                       right_down ? &g_rgd : nullptr);
  fg.g[1] = proj_grads(fu, part.data_ptr<float>() + d * k, d, static_cast<float>(scale),
                       rule_up && !shared_rule ? &g_ru : nullptr, g_lu, right_up ? &g_rgu : nullptr);
  if (bias_down) fg.bias[0] = {g_bd.data_ptr(), dtype_code(bias_down->scalar_type(), op), 0, k, 1.f};
  if (bias_up) fg.bias[1] = {g_bu.data_ptr(), dtype_code(bias_up->scalar_type(), op), k, d, static_cast<float>(scale)};
  fg.csum = csum.data_ptr<float>();
  fg.splits = plan.splits;
  fg.split_stride = 2 * d * k;
  fg.cs_stride = k + d;
  fg.shared_rule = shared_rule;

  CK_DISPATCH_KERNEL_TYPES(dtype, "cuda_adapter_bwd", [&] {
    launch.template bwd<scalar_t>(blocks, args);
    launch.template rows_tn<scalar_t>(tiles, plan.splits, p);
  });
  launch_factor_grads(launch, fg, op);
  return {dx, dres, g_rd, g_ld, g_rgd, g_bd, g_ru, g_lu, g_rgu, g_bu};
}

}  // namespace
}  // namespace adapter
}  // namespace compacter_kernels
