// Each op's signature, declared once. Implementations: cpu/ops_cpu.cpp (CPU), cuda/ (CUDA, when built),
// fake kernels for torch.compile in cfgfast/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(cfgfast, m) {
  // z' of one guided sampler step (SPEC §6, the formula of cfgfast/step.h) written into `out`.
  // pred_cond, pred_uncond: the model's outputs o_c, o_u (float32, bfloat16 or float16, z's shape);
  // weights: float32 [B, 2], per sample (w_cond, w_uncond) with g = w_cond o_c - w_uncond o_u, or [B, 3],
  // (w_cond, w_uncond, w_z) with g = (w_cond o_c - w_uncond o_u) + w_z z;
  // x_prev: the multistep state (float32, z's shape), read where coef's prev != 0 and overwritten with x~;
  // nu: learned variance (the conditional pass's nu, pred_cond's dtype, z's shape), scales the noise;
  // noise: explicit noise instead of SPEC §3's (stream 1, t = step), used only where coef's noise_std != 0;
  // coef: the 10 float64 coefficients of StepCoef, in its order.
  m.def(
      "guided_step_(Tensor(a!) out, Tensor z, Tensor pred_cond, Tensor pred_uncond, Tensor weights, "
      "Tensor(b!)? x_prev, Tensor? nu, Tensor? noise, float[] coef, int seed, int step, int index_offset, "
      "float? clip) -> ()");
  // The same step with its coefficients read from row t of coef_table (float64 [T, 10]), t = step[0] read
  // on the device, so that one captured CUDA graph replays every step.
  m.def(
      "guided_step_table_(Tensor(a!) out, Tensor z, Tensor pred_cond, Tensor pred_uncond, Tensor weights, "
      "Tensor(b!)? x_prev, Tensor? nu, Tensor coef_table, Tensor step, int seed, int index_offset, "
      "float? clip) -> ()");
  // The normals of SPEC §3 for samples index_offset .. index_offset + out.size(0) - 1.
  m.def("normal_noise_(Tensor(a!) out, int seed, int step, int stream, int index_offset) -> ()");
  // The step with SPEC §7's guidance rescale or APG (cfgfast/guidance.py's Guide), each sample's reduction and
  // step in one task (the CPU only): weights [B, 2] the paper's (w_cond, w_uncond); guide [phi] (rescale) or
  // [phi, eta_parallel, norm_threshold, momentum] (APG); running: APG's running value where momentum != 0,
  // updated first.
  m.def(
      "per_sample_guided_step_(Tensor(a!) out, Tensor z, Tensor pred_cond, Tensor pred_uncond, Tensor weights, "
      "Tensor(b!)? running, Tensor(c!)? x_prev, Tensor? nu, Tensor? noise, float[] coef, float[] guide, int seed, "
      "int step, int index_offset, float? clip) -> ()");
  // Per sample b the float64 [V, V + 1] of cfgfast/moments.py: the Gram matrix and the sums of the V = num_vectors
  // vectors v_j = sum_i combos[j * K + i] inputs[i][b] (K = len(inputs) <= 4 tensors of one shape, V <= 4).
  m.def("sample_moments(Tensor[] inputs, float[] combos, int num_vectors) -> Tensor");
}
