// Argument checks shared by the CPU and CUDA implementations of the ops (mirrored by the fake
// kernels in cfgfast/_ops.py). The Python API checks the same things first, with friendlier words;
// these keep a direct torch.ops call from reading out of bounds.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cfgfast/normal.h"
#include "cfgfast/philox.h"
#include "cfgfast/step.h"

namespace cfgfast {

// SPEC §3 limits: c0 = floor(j / 4) and c1 = b are 32-bit counter words.
constexpr int64_t kMaxNumelPerSample = int64_t{1} << 34;
constexpr int64_t kMaxSampleIndex = int64_t{1} << 32;

// The bytes [first, last) a tensor's elements span in memory (0, 0 for an empty tensor). Strides are
// non-negative for every tensor torch makes.
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()))};
}

// A view needing more bytes than its storage holds (a storage shrunk with resize_ after the view was made)
// would be read or written out of bounds.
inline void check_storage(const at::Tensor& t, const char* name) {
  if (t.numel() == 0 || !t.has_storage()) return;
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const int64_t needed = (last + 1) * static_cast<int64_t>(t.element_size());
  TORCH_CHECK_VALUE(needed <= static_cast<int64_t>(t.storage().nbytes()), "cfgfast: ", name, " needs ", needed,
                    " bytes of its storage, which holds ", t.storage().nbytes());
}

// out may be an input itself (the same elements), but no other overlap: the kernels read each element just
// before writing it, never another one. ATen's overlap check compares storages; two storages over the same
// memory (from_numpy, frombuffer) are caught by address.
inline void check_no_partial_overlap(const at::Tensor& out, const at::Tensor& t, const char* name) {
  at::assert_no_partial_overlap(out, t);
  // (a non-contiguous input is copied before anything is written: its memory may lie anywhere)
  if (!t.is_contiguous()) return;
  const auto a = byte_span(out), b = byte_span(t);
  const bool same = out.const_data_ptr() == t.const_data_ptr() && out.sizes() == t.sizes() &&
                    out.strides() == t.strides() && out.scalar_type() == t.scalar_type();
  TORCH_CHECK_VALUE(same || a.first >= b.second || b.first >= a.second, "cfgfast: out must not overlap ", name,
                    " unless it is ", name, " itself (their memory partly overlaps)");
}

// After the checks, before the kernel writes: autograd and cfgfast's own cache of checked tensors see out
// (and x_prev) as modified, as after any in-place op.
inline void mark_written(const at::Tensor& out) { out.unsafeGetTensorImpl()->bump_version(); }

// The step ops write out and, where given, x_prev.
inline void mark_step_outputs_written(const at::Tensor& out, const c10::optional<at::Tensor>& x_prev) {
  mark_written(out);
  if (x_prev.has_value()) mark_written(*x_prev);
}

// (as the Python API: beyond float32's largest value the kernels' float clip would be infinite, no clip)
inline void check_clip(c10::optional<double> clip) {
  TORCH_CHECK_VALUE(!clip.has_value() || (*clip > 0 && *clip <= std::numeric_limits<float>::max()),
                    "cfgfast: clip must be positive and finite in float32, got ",
                    clip.has_value() ? *clip : 0.0);
}

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
  check_storage(out, "out");
}

// x_prev is written (with x~) while every other input is read, by other threads too: no byte of it may be
// shared with another tensor of the call, not even a whole-tensor alias.
inline void check_disjoint(const at::Tensor& x_prev, const at::Tensor& t, const char* name) {
  const auto a = byte_span(x_prev), b = byte_span(t);
  TORCH_CHECK_VALUE(a.first >= b.second || b.first >= a.second, "cfgfast: x_prev must not overlap ", name,
                    " (it is written)");
}

// Shape, dtype and device of one optional input of z's shape; out may be it but must not partly overlap it.
inline void check_like_z(const at::Tensor& out, const at::Tensor& z, const at::Tensor& t, const char* name,
                         at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "cfgfast: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == z.sizes(), "cfgfast: ", name, " must have the shape of z ", z.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == z.device(), "cfgfast: ", name, " must be on ", z.device(), ", got ", t.device());
  check_no_partial_overlap(out, t, name);
  check_storage(t, name);
}

inline void check_guided_step_args(const at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond,
                                   const at::Tensor& pred_uncond, const at::Tensor& weights,
                                   const c10::optional<at::Tensor>& x_prev, const c10::optional<at::Tensor>& nu,
                                   const c10::optional<at::Tensor>& noise, c10::ArrayRef<double> coef,
                                   int64_t step, int64_t index_offset) {
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat, "cfgfast: z must be float32, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.dim() >= 1, "cfgfast: z needs a batch dimension, got a 0-d tensor");
  const auto pred_type = pred_cond.scalar_type();
  TORCH_CHECK_TYPE(pred_type == at::kFloat || pred_type == at::kBFloat16 || pred_type == at::kHalf,
                   "cfgfast: pred_cond must be float32, bfloat16 or float16, got ", pred_type);
  TORCH_CHECK_TYPE(pred_uncond.scalar_type() == pred_type, "cfgfast: pred_uncond must have the dtype of pred_cond (",
                   pred_type, "), got ", pred_uncond.scalar_type());
  TORCH_CHECK_VALUE(pred_cond.sizes() == z.sizes(), "cfgfast: pred_cond must have the shape of z ", z.sizes(),
                    ", got ", pred_cond.sizes());
  TORCH_CHECK_VALUE(pred_uncond.sizes() == z.sizes(), "cfgfast: pred_uncond must have the shape of z ", z.sizes(),
                    ", got ", pred_uncond.sizes());
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat, "cfgfast: weights must be float32, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == z.size(0) && weights.size(1) == 2,
                    "cfgfast: weights must have shape [", z.size(0), ", 2], got ", weights.sizes());
  TORCH_CHECK_VALUE(out.sizes() == z.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(),
                    "cfgfast: out must be a contiguous float32 tensor of shape ", z.sizes());
  for (const auto& t : {pred_cond, pred_uncond, weights, out}) {
    TORCH_CHECK_VALUE(t.device() == z.device(), "cfgfast: all tensors must be on ", z.device(), ", got one on ",
                      t.device());
  }
  // out may be z itself (an in-place step), but must not partly overlap an input
  at::assert_no_internal_overlap(out);
  check_no_partial_overlap(out, z, "z");
  check_no_partial_overlap(out, pred_cond, "pred_cond");
  check_no_partial_overlap(out, pred_uncond, "pred_uncond");
  check_no_partial_overlap(out, weights, "weights");
  check_storage(z, "z");
  check_storage(pred_cond, "pred_cond");
  check_storage(pred_uncond, "pred_uncond");
  check_storage(weights, "weights");
  if (nu.has_value()) check_like_z(out, z, *nu, "nu", pred_type);
  if (noise.has_value()) check_like_z(out, z, *noise, "noise", at::kFloat);
  if (x_prev.has_value()) {
    const at::Tensor& xp = *x_prev;
    TORCH_CHECK_TYPE(xp.scalar_type() == at::kFloat, "cfgfast: x_prev must be float32, got ", xp.scalar_type());
    TORCH_CHECK_VALUE(xp.sizes() == z.sizes(), "cfgfast: x_prev must have the shape of z ", z.sizes(), ", got ",
                      xp.sizes());
    TORCH_CHECK_VALUE(xp.is_contiguous(), "cfgfast: x_prev must be contiguous (it is written in place)");
    TORCH_CHECK_VALUE(xp.device() == z.device(), "cfgfast: x_prev must be on ", z.device(), ", got ", xp.device());
    at::assert_no_internal_overlap(xp);
    check_storage(xp, "x_prev");
    check_disjoint(xp, out, "out");
    check_disjoint(xp, z, "z");
    check_disjoint(xp, pred_cond, "pred_cond");
    check_disjoint(xp, pred_uncond, "pred_uncond");
    check_disjoint(xp, weights, "weights");
    if (nu.has_value()) check_disjoint(xp, *nu, "nu");
    if (noise.has_value()) check_disjoint(xp, *noise, "noise");
  }
  TORCH_CHECK_VALUE(coef.size() == kNumStepCoef, "cfgfast: coef must hold ", kNumStepCoef, " numbers, got ",
                    coef.size());
  check_noise_out(out, step, /*stream=*/1, index_offset);
}

// The table variant: coef_table float64 [T, 10] (row t: the coefficients of step t), step an int64 tensor of
// one element holding t, both on z's device.
inline void check_guided_table_args(const at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond,
                                    const at::Tensor& pred_uncond, const at::Tensor& weights,
                                    const c10::optional<at::Tensor>& x_prev, const c10::optional<at::Tensor>& nu,
                                    const at::Tensor& coef_table, const at::Tensor& step, int64_t index_offset) {
  TORCH_CHECK_TYPE(coef_table.scalar_type() == at::kDouble, "cfgfast: coef_table must be float64, got ",
                   coef_table.scalar_type());
  TORCH_CHECK_VALUE(coef_table.dim() == 2 && coef_table.size(1) == kNumStepCoef && coef_table.size(0) >= 1,
                    "cfgfast: coef_table must have shape [T, ", kNumStepCoef, "], got ", coef_table.sizes());
  TORCH_CHECK_TYPE(step.scalar_type() == at::kLong, "cfgfast: step must be an int64 tensor, got ", step.scalar_type());
  TORCH_CHECK_VALUE(step.numel() == 1, "cfgfast: step must hold one number, got shape ", step.sizes());
  TORCH_CHECK_VALUE(coef_table.device() == z.device() && step.device() == z.device(),
                    "cfgfast: coef_table and step must be on ", z.device());
  TORCH_CHECK_VALUE(coef_table.size(0) <= kMaxSampleIndex, "cfgfast: at most 2^32 steps");
  check_storage(coef_table, "coef_table");
  check_storage(step, "step");
  check_no_partial_overlap(out, coef_table, "coef_table");  // read by other threads while out is written
  check_no_partial_overlap(out, step, "step");
  if (x_prev.has_value()) {
    check_disjoint(*x_prev, coef_table, "coef_table");
    check_disjoint(*x_prev, step, "step");
  }
  const std::vector<double> unit(kNumStepCoef, 1.0);
  check_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, c10::nullopt, unit, 0, index_offset);
}

inline StepCoef step_coef_from(c10::ArrayRef<double> coef) {
  return StepCoef{static_cast<float>(coef[0]), static_cast<float>(coef[1]), static_cast<float>(coef[2]),
                  static_cast<float>(coef[3]), static_cast<float>(coef[4]), static_cast<float>(coef[5]),
                  static_cast<float>(coef[6]), static_cast<float>(coef[7]), static_cast<float>(coef[8]),
                  static_cast<float>(coef[9])};
}

// seed arrives as int64 (two's complement of a seed in [0, 2^64)).
inline NoiseKey noise_key(int64_t seed, int64_t step, int64_t stream) {
  const auto s = static_cast<uint64_t>(seed);
  return NoiseKey{seed_key0(s), seed_key1(s), static_cast<uint32_t>(step), static_cast<uint32_t>(stream)};
}

}  // namespace cfgfast
