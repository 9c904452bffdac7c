// The parts of torch the kernels use: tensors, at::parallel_for, and pybind11 with torch's tensor caster.
// Not <torch/extension.h>, whose whole C++ frontend makes a kernel's first build take twice as long.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>
