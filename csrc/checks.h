// Entry-point argument checks (flash-attention style): fail early with a message naming the
// argument, instead of a bad memory access inside the kernel.
#pragma once
#include <c10/util/Exception.h>

#define CHECK_DEVICE(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())
#define CHECK_SAME_DEVICE(x, y)                                                                  \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", \
              (x).device(), " and ", (y).device())
#define CHECK_SHAPE(x, ...)                                                              \
  TORCH_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
