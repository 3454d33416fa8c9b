// One guided sampler step lambda -> lambda' (SPEC §6), per element, for scalars and SIMD lanes.
//
// Every sampler of SPEC §6 (ddpm, ddim, dpmpp_2m, dpmpp_2m_sde) and every prediction type is affine in the
// state z, the guided prediction g, the previous step's x~ and the noise n, so one formula serves them all:
//
//   g   = w_cond o_c - w_uncond o_u                    (per sample: 1 + w and w for the paper's Eq. 6)
//         + w_z z                                      (where the weights have a third column: a per-sample
//                                                       multiple of z in g, APG's x~_c term, cfgfast/guidance.py)
//   x~  = pred_z z + pred_g g                          (the prediction type: epsilon, v or x0)
//   x~ <- clamp(x~, -clip, clip)                       (with clip)
//   z'  = mean_z z + mean_x x~                         (with clip: the first form of SPEC §2)
//       = direct_z z + direct_g g                      (without: no division-amplified cancellation)
//         + prev x~_prev                               (multistep samplers; only where prev != 0)
//         + uncond o_u                                 (CFG++'s unconditional direction)
//         + noise_std exp(noise_nu nu) n               (nu: learned variance; only where noise_std != 0)
//   x~_prev <- x~                                      (where a multistep state is given)
//
// The float64 coefficients come from the host (cfgfast/samplers.py) and are rounded to float32 once. The last
// step (x~ itself) is the row mean_x = 1, direct_z = pred_z, direct_g = pred_g, every other term 0.
#pragma once

#include "cfgfast/common.h"

namespace cfgfast {

// Order of the coefficient row passed to the ops (cfgfast.samplers.StepCoefficients.as_list()).
struct StepCoef {
  float pred_z;     // x~ = pred_z z + pred_g g
  float pred_g;
  float mean_z;     // z' = mean_z z + mean_x x~            (x~ clipped)
  float mean_x;
  float direct_z;   // z' = direct_z z + direct_g g         (x~ not clipped)
  float direct_g;
  float prev;       // + prev x~_prev
  float uncond;     // + uncond o_u
  float noise_std;  // + noise_std exp(noise_nu nu) n
  float noise_nu;
};
constexpr int kNumStepCoef = 10;

template <class F>
CFGFAST_HOST_DEVICE F guided_output(F out_cond, F out_uncond, F w_cond, F w_uncond) {
  return w_cond * out_cond - w_uncond * out_uncond;
}

// g with the third weight's term, in this order on every backend: (w_cond o_c - w_uncond o_u) + w_z z.
template <class F>
CFGFAST_HOST_DEVICE F guided_output(F out_cond, F out_uncond, F z, F w_cond, F w_uncond, F w_z) {
  return guided_output(out_cond, out_uncond, w_cond, w_uncond) + w_z * z;
}

// x~ of one element (clipped where kClip).
template <bool kClip, class F>
CFGFAST_HOST_DEVICE F predicted_x(F z, F g, const StepCoef& c, float clip) {
  F x = F(c.pred_z) * z + F(c.pred_g) * g;
  if (kClip) x = clamp_nan(x, -clip, clip);
  return x;
}

// z' without its multistep, unconditional and noise terms, from x~ (clipped) or from g.
template <bool kClip, class F>
CFGFAST_HOST_DEVICE F step_mean(F z, F g, F x, const StepCoef& c) {
  if (kClip) return F(c.mean_z) * z + F(c.mean_x) * x;
  return F(c.direct_z) * z + F(c.direct_g) * g;
}

// z' of one element, in this order on every backend (the Python reference twin too):
//   z' = ((step_mean + uncond o_u) + prev x~_prev) + scale n
// The caller passes x_prev = 0 where prev == 0 (the state is not read: it may be uninitialised at a multistep
// sampler's first step) and scale = n = 0 where noise_std == 0 (no noise is drawn); scale is noise_std, or
// noise_std exp(noise_nu nu) with learned variance.
template <bool kClip, class F>
CFGFAST_HOST_DEVICE F step_value(F z, F g, F x, F out_uncond, F x_prev, F scale, F n, const StepCoef& c) {
  F m = step_mean<kClip>(z, g, x, c);
  m = m + F(c.uncond) * out_uncond;
  m = m + F(c.prev) * x_prev;
  return m + scale * n;
}

}  // namespace cfgfast
