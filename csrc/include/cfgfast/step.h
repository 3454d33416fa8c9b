// One reverse step lambda -> lambda' of SPEC §2, per element, for scalars and SIMD lanes.
// The float64 coefficients are computed once on the host (cfgfast/schedule.py) and rounded to float32.
#pragma once

#include "cfgfast/common.h"

namespace cfgfast {

// Order of the coefficient list passed to the ops (cfgfast.schedule.StepCoefficients.as_list()).
struct StepCoef {
  float alpha;        // alpha_lam
  float sigma;        // sigma_lam
  float mean_z;       // alpha_lam' / alpha_lam                          (mu = mean_z z - mean_eps eps)
  float mean_eps;     // (1 - r) alpha_lam' sigma_lam / alpha_lam
  float mean_z_clip;  // r alpha_lam' / alpha_lam                        (mu = mean_z_clip z + mean_x_clip x)
  float mean_x_clip;  // (1 - r) alpha_lam'
  float noise_std;    // sqrt((sigma~^2)^(1-v) (sigma^2)^v)
};
constexpr int kNumStepCoef = 7;

// eps~ = (1 + w) eps_c - w eps_u  (the paper's Eq. 6)
template <class F>
CFGFAST_HOST_DEVICE F guided_eps(F eps_cond, F eps_uncond, F one_plus_w, F w) {
  return one_plus_w * eps_cond - w * eps_uncond;
}

// z' for a non-last step. kClip: x~ is clamped to [-clip, clip] and mu uses its first form.
template <bool kClip, class F>
CFGFAST_HOST_DEVICE F step_value(F z, F eps, F n, const StepCoef& c, float clip) {
  if (kClip) {
    F x = (z - F(c.sigma) * eps) / F(c.alpha);
    x = clamp_(x, -clip, clip);
    return F(c.mean_z_clip) * z + F(c.mean_x_clip) * x + F(c.noise_std) * n;
  }
  return F(c.mean_z) * z - F(c.mean_eps) * eps + F(c.noise_std) * n;
}

// The last step returns x~ itself, no noise.
template <bool kClip, class F>
CFGFAST_HOST_DEVICE F last_value(F z, F eps, const StepCoef& c, float clip) {
  F x = (z - F(c.sigma) * eps) / F(c.alpha);
  if (kClip) x = clamp_(x, -clip, clip);
  return x;
}

}  // namespace cfgfast
