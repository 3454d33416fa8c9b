// The ops' argument checks, shared by the CPU and CUDA implementations. cfgfast/_checks.py's op_* functions are
// their Python twin (the fake kernels, the Triton ops, the reference backend): the same checks in the same order,
// with the same words. They keep a direct torch.ops call from reading or writing out of bounds.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "cfgfast/normal.h"
#include "cfgfast/philox.h"
#include "cfgfast/step.h"

namespace cfgfast {

// SPEC §3 limits: c0 = floor(j / 4) and c1 = b are 32-bit counter words.
constexpr int64_t kMaxNumelPerSample = int64_t{1} << 34;
constexpr int64_t kMaxSampleIndex = int64_t{1} << 32;

// One tensor argument and its name; t is null for an optional argument not given.
struct Arg {
  const char* name;
  const at::Tensor* t;
};

inline const at::Tensor* given(const c10::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// The elements from a tensor's first to its last one, inclusive (strides are non-negative for every tensor torch
// makes), and the bytes [first, last) they span in memory ((0, 0) for an empty tensor).
inline int64_t extent(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return last + 1;
}

inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>(extent(t) * static_cast<int64_t>(t.element_size()))};
}

// Whether two byte spans share no byte.
inline bool apart(std::pair<uintptr_t, uintptr_t> a, std::pair<uintptr_t, uintptr_t> b) {
  return a.first >= b.second || b.first >= a.second;
}

// A view needing more bytes than its storage holds (a storage shrunk with resize_ after the view was made)
// would be read or written out of bounds.
inline void check_storage(const at::Tensor& t, const char* name) {
  if (t.numel() == 0 || !t.has_storage()) return;
  const int64_t needed = (t.storage_offset() + extent(t)) * static_cast<int64_t>(t.element_size());
  TORCH_CHECK_VALUE(needed <= static_cast<int64_t>(t.storage().nbytes()), "cfgfast: ", name, " needs ", needed,
                    " bytes of its storage, which holds ", t.storage().nbytes());
}

// torch refuses in-place writes to a tensor made under inference_mode once outside it; say so by name.
inline void check_writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), "cfgfast: ", name,
                    " was made under torch.inference_mode() and cannot be written outside it (torch refuses in-place "
                    "updates of inference tensors there): call inside inference_mode, or pass one made outside it");
}

// The memory of a step's tensors. out may be an input itself (the same elements) but must not partly overlap
// one: the kernels read each element just before writing it, never another one. A non-contiguous input is copied
// before anything is written, so its memory may lie anywhere (but ATen's check, first, refuses a dense one, such as
// a permutation, over part of out in the same storage). ATen's overlap check compares storages; two storages over
// the same memory (from_numpy, frombuffer) are caught by address. x_prev, written (with x~) while every other
// tensor is read, by other threads too, shares no byte with any, not even as a whole-tensor alias.
inline void check_step_memory(const at::Tensor& out, const c10::optional<at::Tensor>& x_prev,
                              std::initializer_list<Arg> inputs) {
  const auto o = byte_span(out), x = x_prev.has_value() ? byte_span(*x_prev) : std::pair<uintptr_t, uintptr_t>{};
  if (x_prev.has_value()) check_storage(*x_prev, "x_prev");
  for (const auto& [name, t] : inputs) {
    if (t == nullptr) continue;
    at::assert_no_partial_overlap(out, *t);
    const auto b = byte_span(*t);
    const bool same = out.const_data_ptr() == t->const_data_ptr() && out.sizes() == t->sizes() &&
                      out.strides() == t->strides() && out.scalar_type() == t->scalar_type();
    TORCH_CHECK_VALUE(same || !t->is_contiguous() || apart(b, o), "cfgfast: out must not partly overlap ", name,
                      " (it may be ", name, " itself, for an in-place step)");
    check_storage(*t, name);
    TORCH_CHECK_VALUE(!x_prev.has_value() || apart(b, x), "cfgfast: x_prev must not overlap ", name,
                      " (it is written)");
  }
}

// After the checks, before the kernel writes: autograd and cfgfast's own cache of checked tensors see out
// (and x_prev) as modified, as after any in-place op.
inline void mark_written(const at::Tensor& out) { out.unsafeGetTensorImpl()->bump_version(); }

// The step ops write out and, where given, x_prev.
inline void mark_step_outputs_written(const at::Tensor& out, const c10::optional<at::Tensor>& x_prev) {
  mark_written(out);
  if (x_prev.has_value()) mark_written(*x_prev);
}

inline void check_noise_out(const at::Tensor& out, int64_t step, int64_t stream, int64_t index_offset) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "cfgfast: out must be float32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() >= 1, "cfgfast: out needs a batch dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(out.is_contiguous(), "cfgfast: out must be contiguous");
  check_writable(out, "out");
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

inline void check_guided_step_args(const at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond,
                                   const at::Tensor& pred_uncond, const at::Tensor& weights,
                                   const c10::optional<at::Tensor>& x_prev, const c10::optional<at::Tensor>& nu,
                                   const c10::optional<at::Tensor>& noise, c10::ArrayRef<double> coef,
                                   int64_t step, int64_t index_offset, c10::optional<double> clip) {
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat, "cfgfast: z must be float32, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.dim() >= 1, "cfgfast: z needs a batch dimension, got a 0-d tensor");
  const auto pred_type = pred_cond.scalar_type();
  TORCH_CHECK_TYPE(pred_type == at::kFloat || pred_type == at::kBFloat16 || pred_type == at::kHalf,
                   "cfgfast: pred_cond must be float32, bfloat16 or float16, got ", pred_type);
  // the inputs of z's shape, with the argument whose dtype each must have
  const std::pair<Arg, Arg> like_z[] = {{{"pred_cond", &pred_cond}, {"pred_cond", &pred_cond}},
                                        {{"pred_uncond", &pred_uncond}, {"pred_cond", &pred_cond}},
                                        {{"nu", given(nu)}, {"pred_cond", &pred_cond}},
                                        {{"noise", given(noise)}, {"z", &z}}};
  for (const auto& [in, like] : like_z) {
    if (in.t == nullptr) continue;
    TORCH_CHECK_TYPE(in.t->scalar_type() == like.t->scalar_type(), "cfgfast: ", in.name, " must have the dtype of ",
                     like.name, " (", like.t->scalar_type(), "), got ", in.t->scalar_type());
    TORCH_CHECK_VALUE(in.t->sizes() == z.sizes(), "cfgfast: ", in.name, " must have the shape of z ", z.sizes(),
                      ", got ", in.t->sizes());
    TORCH_CHECK_VALUE(in.t->device() == z.device(), "cfgfast: ", in.name, " must be on z's device ", z.device(),
                      ", got ", in.t->device());
  }
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat, "cfgfast: weights must be float32, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == z.size(0) && (weights.size(1) == 2 || weights.size(1) == 3),
                    "cfgfast: weights must have shape [", z.size(0), ", 2] or [", z.size(0), ", 3], got ",
                    weights.sizes());
  TORCH_CHECK_VALUE(weights.device() == z.device(), "cfgfast: weights must be on z's device ", z.device(), ", got ",
                    weights.device());
  for (const auto& [name, t] : {Arg{"out", &out}, Arg{"x_prev", given(x_prev)}}) {  // the written tensors
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->sizes() == z.sizes() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                          t->device() == z.device(),
                      "cfgfast: ", name, " must be a contiguous float32 tensor of z's shape ", z.sizes(), " on ",
                      z.device());
    check_writable(*t, name);
  }
  TORCH_CHECK_VALUE(coef.size() == kNumStepCoef, "cfgfast: coef must hold ", kNumStepCoef, " numbers, got ",
                    coef.size());
  // (as the Python API: beyond float32's largest value the kernels' float clip would be infinite, no clip)
  TORCH_CHECK_VALUE(!clip.has_value() || (*clip > 0 && *clip <= std::numeric_limits<float>::max()),
                    "cfgfast: clip must be positive and finite in float32 (clip=None: no clipping), got ",
                    clip.has_value() ? *clip : 0.0);
  check_noise_out(out, step, /*stream=*/1, index_offset);
  // (out among the inputs: x_prev must not overlap it either)
  check_step_memory(out, x_prev, {{"z", &z}, {"pred_cond", &pred_cond}, {"pred_uncond", &pred_uncond},
                                  {"weights", &weights}, {"nu", given(nu)}, {"noise", given(noise)}, {"out", &out}});
}

// The table variant: coef_table float64 [T, 10] (row t: the coefficients of step t), step an int64 tensor of
// one element holding t, both on z's device.
inline void check_guided_table_args(const at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond,
                                    const at::Tensor& pred_uncond, const at::Tensor& weights,
                                    const c10::optional<at::Tensor>& x_prev, const c10::optional<at::Tensor>& nu,
                                    const at::Tensor& coef_table, const at::Tensor& step, int64_t index_offset,
                                    c10::optional<double> clip) {
  TORCH_CHECK_VALUE(coef_table.scalar_type() == at::kDouble && coef_table.dim() == 2 &&
                        coef_table.size(1) == kNumStepCoef && coef_table.size(0) >= 1 &&
                        coef_table.size(0) <= kMaxSampleIndex,
                    "cfgfast: coef_table must be a float64 tensor of shape [T, ", kNumStepCoef,
                    "] (T at most 2^32; cfgfast.step_table), got ", coef_table.scalar_type(), " ", coef_table.sizes());
  TORCH_CHECK_VALUE(step.scalar_type() == at::kLong && step.numel() == 1,
                    "cfgfast: step must be an int64 tensor holding one number, got ", step.scalar_type(), " ",
                    step.sizes());
  TORCH_CHECK_VALUE(coef_table.device() == z.device() && step.device() == z.device(),
                    "cfgfast: coef_table and step must be on z's device ", z.device());
  const std::vector<double> unit(kNumStepCoef, 1.0);
  check_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, c10::nullopt, unit, 0, index_offset,
                         clip);
  // (read by other threads while out and x_prev are written)
  check_step_memory(out, x_prev, {{"coef_table", &coef_table}, {"step", &step}});
}

// cfgfast::per_sample_guided_step_: the step's arguments with weights [B, 2] (w_cond, w_uncond); guide [phi] or
// [phi, eta_parallel, norm_threshold, momentum] (APG); running (APG's running value, written) given exactly where
// momentum != 0, then a contiguous float32 tensor of z's shape sharing no byte with any other, and pred_cond float32
// (the step reads it beside running).
inline void check_per_sample_guidance_args(const at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond,
                                           const at::Tensor& pred_uncond, const at::Tensor& weights,
                                           const c10::optional<at::Tensor>& running,
                                           const c10::optional<at::Tensor>& x_prev,
                                           const c10::optional<at::Tensor>& nu,
                                           const c10::optional<at::Tensor>& noise, c10::ArrayRef<double> coef,
                                           c10::ArrayRef<double> guide, int64_t step, int64_t index_offset,
                                           c10::optional<double> clip) {
  check_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, step, index_offset, clip);
  TORCH_CHECK_VALUE(weights.size(1) == 2, "cfgfast: weights must have shape [", z.size(0), ", 2], got ",
                    weights.sizes());
  TORCH_CHECK_VALUE(guide.size() == 1 || guide.size() == 4, "cfgfast: guide must be [phi] or [phi, eta_parallel, ",
                    "norm_threshold, momentum], got ", guide.size(), " numbers");
  const bool momentum = guide.size() == 4 && guide[3] != 0.0;
  TORCH_CHECK_VALUE(running.has_value() == momentum, "cfgfast: running (APG's running value) is given where momentum ",
                    "!= 0 and only there");
  if (!momentum) return;
  TORCH_CHECK_VALUE(running->sizes() == z.sizes() && running->scalar_type() == at::kFloat &&
                        running->is_contiguous() && running->device() == z.device() &&
                        pred_cond.scalar_type() == at::kFloat,
                    "cfgfast: running must be a contiguous float32 tensor of z's shape ", z.sizes(), " on ",
                    z.device(), ", with float32 pred_cond");
  check_writable(*running, "running");
  check_storage(*running, "running");
  const auto r = byte_span(*running);
  for (const auto& [name, t] : {Arg{"out", &out}, Arg{"z", &z}, Arg{"pred_cond", &pred_cond},
                                Arg{"pred_uncond", &pred_uncond}, Arg{"weights", &weights},
                                Arg{"x_prev", given(x_prev)}, Arg{"nu", given(nu)}, Arg{"noise", given(noise)}}) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(apart(byte_span(*t), r), "cfgfast: running must not overlap ", name, " (it is written)");
  }
}

// cfgfast::sample_moments: 1 to 4 tensors of one shape [B, ...] on one device (float32, bfloat16, float16 or
// float64), and the num_vectors x len(inputs) numbers of the combinations.
constexpr int kMaxMomentInputs = 4;
constexpr int kMaxMomentVectors = 4;

inline void check_moments_args(at::TensorList inputs, c10::ArrayRef<double> combos, int64_t num_vectors) {
  const int64_t k = static_cast<int64_t>(inputs.size());
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxMomentInputs, "cfgfast: inputs must hold 1 to ", kMaxMomentInputs,
                    " tensors, got ", k);
  TORCH_CHECK_VALUE(num_vectors >= 1 && num_vectors <= kMaxMomentVectors, "cfgfast: num_vectors must be in [1, ",
                    kMaxMomentVectors, "], got ", num_vectors);
  TORCH_CHECK_VALUE(static_cast<int64_t>(combos.size()) == k * num_vectors, "cfgfast: combos must hold num_vectors x ",
                    "len(inputs) = ", num_vectors, " x ", k, " numbers, got ", combos.size());
  const at::Tensor& first = inputs[0];
  TORCH_CHECK_VALUE(first.dim() >= 1, "cfgfast: inputs need a batch dimension, got a 0-d inputs[0]");
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor& t = inputs[i];
    const auto dtype = t.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
                     "cfgfast: inputs[", i, "] must be float32, bfloat16, float16 or float64, got ", dtype);
    TORCH_CHECK_VALUE(t.sizes() == first.sizes(), "cfgfast: inputs[", i, "] must have the shape of inputs[0] ",
                      first.sizes(), ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == first.device(), "cfgfast: inputs[", i, "] must be on ", first.device(),
                      " like inputs[0], got ", t.device());
    check_storage(t, ("inputs[" + std::to_string(i) + "]").c_str());
  }
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
