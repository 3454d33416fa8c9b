// Each op's signature, declared once. Implementations: cpu/ops_cpu.cpp (CPU), cuda/ (CUDA, when built),
// fake kernels for torch.compile in cfgfast/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(cfgfast, m) {
  // z' of one reverse step (SPEC §2) written into `out`; noise drawn in-kernel (SPEC §3, stream 1,
  // t = step) unless `noise` is given. coef: the 7 float64 coefficients of StepCoef, in its order.
  m.def(
      "reverse_step_(Tensor(a!) out, Tensor z, Tensor eps_cond, Tensor eps_uncond, Tensor w, "
      "Tensor? noise, float[] coef, int seed, int step, int index_offset, float? clip, bool last) -> ()");
  // The same step with its coefficients read from row t of coef_table (float64 [T, 7]), t = step[0] read
  // on the device, so that one captured CUDA graph replays every step; t = T - 1 is the last step.
  m.def(
      "reverse_step_table_(Tensor(a!) out, Tensor z, Tensor eps_cond, Tensor eps_uncond, Tensor w, "
      "Tensor coef_table, Tensor step, int seed, int index_offset, float? clip) -> ()");
  // The normals of SPEC §3 for samples index_offset .. index_offset + out.size(0) - 1.
  m.def("normal_noise_(Tensor(a!) out, int seed, int step, int stream, int index_offset) -> ()");
}
