// Shared-memory race check of the adapter kernels without a GPU: built with ThreadSanitizer by
// tests/test_cuda_emulation.py, it runs the forward and backward kernels in the emulator at
// shapes that take each of their paths. A block's threads are std::threads that synchronise
// only at __syncthreads (a std::barrier), so a missing barrier between a shared-memory write and
// another thread's read is a data race ThreadSanitizer reports (compute-sanitizer racecheck's
// job on a GPU). Correctness is tested elsewhere; this only has to run cleanly.
#include "emulated_launcher.h"  // first: the CUDA names the kernels use

#include <ATen/ops/randn.h>

#include <cstdio>

using compacter_kernels::adapter::EmulatedLauncher;

int main() {
  struct Case {
    int64_t M, d, k;
    at::ScalarType dtype;
    bool residual;  // an fp32 residual (and an fp32 dy, as under autocast)
  };
  const Case cases[] = {
      {37, 48, 24, at::kFloat, false},      // x kept in shared memory, 2 row blocks
      {37, 48, 24, at::kBFloat16, false},   // the same on the (emulated) tensor cores
      {17, 1100, 24, at::kHalf, false},     // x streamed in 64-column chunks
      {19, 72, 300, at::kBFloat16, true},   // k > 256: two passes, 16-row blocks
      {21, 100, 192, at::kFloat, true},     // k > 128: 16-row blocks, d % 8 != 0
  };
  EmulatedLauncher launch;
  for (const Case& c : cases) {
    const auto opt = at::TensorOptions().dtype(c.dtype);
    const auto x = at::randn({c.M, c.d}, opt), h_down = at::randn({c.d, c.k}, opt), h_up = at::randn({c.k, c.d}, opt);
    const auto bias_down = at::randn({c.k}, opt), bias_up = at::randn({c.d}, opt);
    std::optional<at::Tensor> residual;
    if (c.residual) residual = at::randn({c.M, c.d});
    const auto out_dtype = c.residual ? at::kFloat : c.dtype;
    auto [y, z] = compacter_kernels::adapter::adapter_fwd(launch, x, residual, h_down, bias_down, h_up, bias_up,
                                                          /*activation=*/0, 0.5, out_dtype);
    const auto dy = at::randn({c.M, c.d}, at::TensorOptions().dtype(out_dtype));
    // A PHM down projection (n = 4, rank 2: d and k are multiples of 4) and a dense up one.
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    const auto rule = at::randn({4, 4, 4}, f32), left = at::randn({4, c.d / 4, 2}, f32);
    const auto right = at::randn({4, 2, c.k / 4}, f32);
    compacter_kernels::adapter::adapter_bwd(launch, dy, x, z, h_down, h_up, rule, left, right, bias_down,
                                            std::nullopt, h_up, std::nullopt, bias_up, /*activation=*/0, 0.5,
                                            c.residual, /*shared_rule=*/false);
    std::printf("M=%lld d=%lld k=%lld %s residual=%d: ran\n", static_cast<long long>(c.M), static_cast<long long>(c.d),
                static_cast<long long>(c.k), c10::toString(c.dtype), static_cast<int>(c.residual));
  }
  std::printf("ok\n");
  return 0;
}
