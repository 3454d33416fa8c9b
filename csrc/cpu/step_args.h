// The fused step's arguments from an op's tensors (ops_cpu.cpp's step, guidance_cpu.cpp's per-sample step).
#pragma once

#include <ATen/core/Tensor.h>

#include "kernel.h"
#include "op_checks.h"

namespace cfgfast::cpu {

// The inputs the kernel reads, in logical C order everywhere (the noise index j does not depend on the memory format):
// contiguous copies where they are not, kept alive here while the kernel runs.
struct HeldInputs {
  at::Tensor z, pred_cond, pred_uncond, weights, nu, noise;
};

inline EpsType eps_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return EpsType::kBFloat16;
    case at::kHalf: return EpsType::kFloat16;
    default: return EpsType::kFloat32;
  }
}

// For arguments the op's checks accepted.
inline StepArgs step_args(at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond,
                          const at::Tensor& pred_uncond, const at::Tensor& weights,
                          const c10::optional<at::Tensor>& x_prev, const c10::optional<at::Tensor>& nu,
                          const c10::optional<at::Tensor>& noise, c10::ArrayRef<double> coef, int64_t seed,
                          int64_t step, int64_t index_offset, c10::optional<double> clip, HeldInputs& held) {
  held.z = z.contiguous();
  held.pred_cond = pred_cond.contiguous();
  held.pred_uncond = pred_uncond.contiguous();
  held.weights = weights.contiguous();
  if (nu.has_value()) held.nu = nu->contiguous();
  if (noise.has_value()) held.noise = noise->contiguous();
  const int64_t batch = z.size(0);
  StepArgs args{};
  args.out = out.data_ptr<float>();
  args.z = held.z.const_data_ptr<float>();
  args.pred_cond = held.pred_cond.const_data_ptr();
  args.pred_uncond = held.pred_uncond.const_data_ptr();
  args.eps_type = eps_type_of(held.pred_cond);
  args.weights = held.weights.const_data_ptr<float>();
  args.weight_columns = held.weights.size(1);
  args.x_prev = x_prev.has_value() ? x_prev->data_ptr<float>() : nullptr;
  args.nu = nu.has_value() ? held.nu.const_data_ptr() : nullptr;
  args.noise = noise.has_value() ? held.noise.const_data_ptr<float>() : nullptr;
  args.numel_per_sample = batch == 0 ? 0 : z.numel() / batch;
  args.coef = step_coef_from(coef);
  args.has_clip = clip.has_value();
  args.clip = clip.has_value() ? static_cast<float>(*clip) : 0.0f;
  args.key = noise_key(seed, step, /*stream=*/1);
  args.index_offset = static_cast<uint64_t>(index_offset);
  return args;
}

}  // namespace cfgfast::cpu
