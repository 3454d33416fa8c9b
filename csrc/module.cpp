// The Python module cfgfast._C: importing it loads the op registrations of this library
// (TORCH_LIBRARY in ops.cpp and the per-device TORCH_LIBRARY_IMPLs) and exposes the build facts.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/version.h>

#include <array>
#include <string>
#include <vector>

#include "cfgfast/philox.h"
#include "cpu/kernel.h"
#ifdef CFGFAST_WITH_CUDA
#include "cuda/step_cuda.h"
#endif

namespace py = pybind11;

#ifndef CFGFAST_CUDA_ARCH_LIST
#define CFGFAST_CUDA_ARCH_LIST ""
#endif
#ifndef CFGFAST_CUDA_NOTE
#define CFGFAST_CUDA_NOTE "not recorded (built outside setup.py)"
#endif

namespace {

std::vector<std::string> split_arch(const std::string& list) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : list) {
    if (ch == ';' || ch == ' ' || ch == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(ch);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

cfgfast::cpu::Isa isa_from_name(const std::string& name) {
  for (auto isa : {cfgfast::cpu::Isa::kScalar, cfgfast::cpu::Isa::kAvx2}) {
    if (name == cfgfast::cpu::isa_name(isa)) return isa;
  }
  throw py::value_error("cfgfast: unknown cpu isa '" + name + "', expected 'scalar' or 'avx2'");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cfgfast compiled kernels (ops under torch.ops.cfgfast)";

  m.def("build_info", [] {
    py::dict info;
    std::vector<std::string> compiled, supported;
    for (auto isa : {cfgfast::cpu::Isa::kScalar, cfgfast::cpu::Isa::kAvx2}) {
      if (cfgfast::cpu::isa_compiled(isa)) compiled.emplace_back(cfgfast::cpu::isa_name(isa));
      if (cfgfast::cpu::isa_supported(isa)) supported.emplace_back(cfgfast::cpu::isa_name(isa));
    }
    info["cpu_kernel"] = true;
    info["cpu_isa_compiled"] = compiled;
    info["cpu_isa_supported"] = supported;
    info["cpu_isa"] = std::string(cfgfast::cpu::isa_name(cfgfast::cpu::active_isa()));
#ifdef CFGFAST_WITH_CUDA
    info["cuda_kernel"] = true;
#else
    info["cuda_kernel"] = false;
#endif
    info["cuda_arch"] = split_arch(CFGFAST_CUDA_ARCH_LIST);
    info["cuda_build"] = std::string(CFGFAST_CUDA_NOTE);  // why the CUDA kernels were or were not built
    info["torch_built_against"] = std::string(TORCH_VERSION);
#if defined(__VERSION__)
    info["compiler"] = std::string(__VERSION__);
#endif
    return info;
  });

  m.def("cpu_isa", [] { return std::string(cfgfast::cpu::isa_name(cfgfast::cpu::active_isa())); },
        "The instruction set the CPU kernel uses now.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        const auto isa = isa_from_name(name);
        if (!cfgfast::cpu::isa_supported(isa)) {
          throw py::value_error("cfgfast: this CPU or build cannot run the '" + name + "' kernel");
        }
        const std::string previous = cfgfast::cpu::isa_name(cfgfast::cpu::active_isa());
        cfgfast::cpu::set_active_isa(isa);
        return previous;
      },
      "Choose the CPU kernel's instruction set (tests compare them); returns the previous one.");

#ifdef CFGFAST_WITH_CUDA
  m.def(
      "set_cuda_groups_per_thread",
      [](int n) {
        if (n < 0 || n > 2) {
          throw py::value_error(
              "cfgfast: groups per thread must be 1 or 2 (or 0: chosen by the model outputs' dtype), got " +
              std::to_string(n));
        }
        return cfgfast::set_cuda_groups_per_thread(n);
      },
      "The CUDA step kernel's groups of four elements per thread and round: 1 or 2, or 0 (the default) to choose "
      "by the model outputs' dtype. A tuning knob for benchmarks; returns the previous setting.");
  m.def(
      "set_cuda_blocks_per_sm",
      [](int n) {
        if (n < 0 || n > cfgfast::kMaxBlocksPerSm) {
          throw py::value_error("cfgfast: blocks per SM must be in [1, " + std::to_string(cfgfast::kMaxBlocksPerSm) +
                                "] (or 0: the defaults), got " + std::to_string(n));
        }
        return cfgfast::set_cuda_blocks_per_sm(n);
      },
      "The CUDA kernels' grids: at most n blocks of 256 threads per SM, or 0 for the defaults, 128 for the step "
      "kernel and 32 for the noise kernel (several waves of the blocks an SM holds at once). A tuning knob for "
      "benchmarks; returns the previous setting.");
#endif

  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
        cfgfast::philox4x32_10(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1]);
        return ctr;
      },
      py::arg("counter"), py::arg("key"), "Philox4x32-10 of the compiled kernels, for known-answer tests.");
}
