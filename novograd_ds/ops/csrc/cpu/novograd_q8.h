// The 8-bit moment's entry points of the fused CPU op (novograd_q8.cpp), registered into the op's module by
// novograd_cpu.cpp's PYBIND11_MODULE.
#pragma once

#include <torch/extension.h>

namespace novograd_cpu {

void register_q8(pybind11::module_& mod);

}  // namespace novograd_cpu
