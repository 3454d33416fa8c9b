// Argument checks shared by the CPU and CUDA implementations of the ops (mirrored by the fake
// kernels in cfgfast/_ops.py). The Python API checks the same things first, with friendlier words;
// these keep a direct torch.ops call from reading out of bounds.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "cfgfast/normal.h"
#include "cfgfast/philox.h"
#include "cfgfast/step.h"

namespace cfgfast {

// SPEC §3 limits: c0 = floor(j / 4) and c1 = b are 32-bit counter words.
constexpr int64_t kMaxNumelPerSample = int64_t{1} << 34;
constexpr int64_t kMaxSampleIndex = int64_t{1} << 32;

inline void check_noise_out(const at::Tensor& out, int64_t step, int64_t stream, int64_t index_offset) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "cfgfast: out must be float32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() >= 1, "cfgfast: out needs a batch dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(out.is_contiguous(), "cfgfast: out must be contiguous");
  TORCH_CHECK_VALUE(step >= 0 && step < kMaxSampleIndex, "cfgfast: step must be in [0, 2^32), got ", step);
  TORCH_CHECK_VALUE(stream >= 0 && stream < kMaxSampleIndex, "cfgfast: stream must be in [0, 2^32), got ", stream);
  // (written so that it cannot overflow: index_offset + batch wraps negative for index_offset near 2^63)
  TORCH_CHECK_VALUE(index_offset >= 0 && index_offset <= kMaxSampleIndex - out.size(0),
                    "cfgfast: index_offset + batch must be in [0, 2^32], got index_offset=", index_offset);
  const int64_t batch = out.size(0);
  TORCH_CHECK_VALUE(batch == 0 || out.numel() / batch <= kMaxNumelPerSample,
                    "cfgfast: at most 2^34 elements per sample");
}

inline void check_step_args(const at::Tensor& out, const at::Tensor& z, const at::Tensor& eps_cond,
                            const at::Tensor& eps_uncond, const at::Tensor& w,
                            const c10::optional<at::Tensor>& noise, c10::ArrayRef<double> coef,
                            int64_t step, int64_t index_offset) {
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat, "cfgfast: z must be float32, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.dim() >= 1, "cfgfast: z needs a batch dimension, got a 0-d tensor");
  const auto eps_type = eps_cond.scalar_type();
  TORCH_CHECK_TYPE(eps_type == at::kFloat || eps_type == at::kBFloat16 || eps_type == at::kHalf,
                   "cfgfast: eps_cond must be float32, bfloat16 or float16, got ", eps_type);
  TORCH_CHECK_TYPE(eps_uncond.scalar_type() == eps_type, "cfgfast: eps_uncond must have the dtype of eps_cond (",
                   eps_type, "), got ", eps_uncond.scalar_type());
  TORCH_CHECK_VALUE(eps_cond.sizes() == z.sizes(), "cfgfast: eps_cond must have the shape of z ", z.sizes(),
                    ", got ", eps_cond.sizes());
  TORCH_CHECK_VALUE(eps_uncond.sizes() == z.sizes(), "cfgfast: eps_uncond must have the shape of z ", z.sizes(),
                    ", got ", eps_uncond.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "cfgfast: w must be float32, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == z.size(0), "cfgfast: w must have shape [", z.size(0),
                    "], got ", w.sizes());
  if (noise.has_value()) {
    TORCH_CHECK_TYPE(noise->scalar_type() == at::kFloat, "cfgfast: noise must be float32, got ", noise->scalar_type());
    TORCH_CHECK_VALUE(noise->sizes() == z.sizes(), "cfgfast: noise must have the shape of z ", z.sizes(),
                      ", got ", noise->sizes());
  }
  TORCH_CHECK_VALUE(out.sizes() == z.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(),
                    "cfgfast: out must be a contiguous float32 tensor of shape ", z.sizes());
  for (const auto& t : {eps_cond, eps_uncond, w, out}) {
    TORCH_CHECK_VALUE(t.device() == z.device(), "cfgfast: all tensors must be on ", z.device(), ", got one on ",
                      t.device());
  }
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->device() == z.device(), "cfgfast: noise must be on ", z.device(), ", got ",
                      noise->device());
  }
  // out may be z itself (an in-place step), but must not partly overlap an input: the kernels read each
  // element just before writing it, never another element.
  at::assert_no_internal_overlap(out);
  for (const auto& t : {z, eps_cond, eps_uncond, w}) at::assert_no_partial_overlap(out, t);
  if (noise.has_value()) at::assert_no_partial_overlap(out, *noise);
  TORCH_CHECK_VALUE(coef.size() == kNumStepCoef, "cfgfast: coef must hold ", kNumStepCoef, " numbers, got ",
                    coef.size());
  check_noise_out(out, step, /*stream=*/1, index_offset);
}

// The table variant: coef_table float64 [T, 7] (row t: the step lam_t -> lam_t+1; the last row: x~ at
// lam_T-1), step an int64 tensor of one element holding t, both on z's device.
inline void check_table_args(const at::Tensor& out, const at::Tensor& z, const at::Tensor& eps_cond,
                             const at::Tensor& eps_uncond, const at::Tensor& w, const at::Tensor& coef_table,
                             const at::Tensor& step, int64_t index_offset) {
  TORCH_CHECK_TYPE(coef_table.scalar_type() == at::kDouble, "cfgfast: coef_table must be float64, got ",
                   coef_table.scalar_type());
  TORCH_CHECK_VALUE(coef_table.dim() == 2 && coef_table.size(1) == kNumStepCoef && coef_table.size(0) >= 1,
                    "cfgfast: coef_table must have shape [T, ", kNumStepCoef, "], got ", coef_table.sizes());
  TORCH_CHECK_TYPE(step.scalar_type() == at::kLong, "cfgfast: step must be an int64 tensor, got ", step.scalar_type());
  TORCH_CHECK_VALUE(step.numel() == 1, "cfgfast: step must hold one number, got shape ", step.sizes());
  TORCH_CHECK_VALUE(coef_table.device() == z.device() && step.device() == z.device(),
                    "cfgfast: coef_table and step must be on ", z.device());
  TORCH_CHECK_VALUE(coef_table.size(0) <= kMaxSampleIndex, "cfgfast: at most 2^32 steps");
  const std::vector<double> unit(kNumStepCoef, 1.0);
  check_step_args(out, z, eps_cond, eps_uncond, w, c10::nullopt, unit, 0, index_offset);
}

inline StepCoef step_coef_from(c10::ArrayRef<double> coef) {
  return StepCoef{static_cast<float>(coef[0]), static_cast<float>(coef[1]), static_cast<float>(coef[2]),
                  static_cast<float>(coef[3]), static_cast<float>(coef[4]), static_cast<float>(coef[5]),
                  static_cast<float>(coef[6])};
}

// seed arrives as int64 (two's complement of a seed in [0, 2^64)).
inline NoiseKey noise_key(int64_t seed, int64_t step, int64_t stream) {
  const auto s = static_cast<uint64_t>(seed);
  return NoiseKey{seed_key0(s), seed_key1(s), static_cast<uint32_t>(step), static_cast<uint32_t>(stream)};
}

}  // namespace cfgfast
