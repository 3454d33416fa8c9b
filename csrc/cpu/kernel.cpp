// Scalar tail of the fused CPU kernel and the run-time choice of instruction set.
// Compiled for the baseline x86-64 (or any) target; the AVX2 body lives in kernel_avx2.cpp.
#include "kernel.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace cfgfast::cpu {
namespace {

template <class EpsT, bool kClip, NoiseMode kNoise>
struct ScalarStep {
  static int64_t run(const StepArgs& a, int64_t b, int64_t g0, int64_t g1) {
    const int64_t n_per = a.numel_per_sample;
    const int64_t base = b * n_per;
    const auto* pc = static_cast<const EpsT*>(a.pred_cond);
    const auto* pu = static_cast<const EpsT*>(a.pred_uncond);
    const auto* pnu = static_cast<const EpsT*>(a.nu);
    const StepCoef& c = a.coef;
    const float* const w = a.weights + a.weight_columns * b;
    const bool with_z = a.weight_columns == 3;
    const float w_cond = w[0], w_uncond = w[1], w_z = with_z ? w[2] : 0.0f;
    // the state is not read where prev == 0: it may be uninitialised at a multistep sampler's first step
    const float* const prev_in = c.prev != 0.0f ? a.x_prev : nullptr;
    const bool read_nu = kNoise != NoiseMode::kNone && pnu != nullptr;
    const auto sample = static_cast<uint32_t>(a.index_offset + static_cast<uint64_t>(b));
    for (int64_t g = g0; g < g1; ++g) {
      float n[4] = {0.f, 0.f, 0.f, 0.f};
      if (kNoise == NoiseMode::kDrawn) normals4<float, uint32_t>(a.key, static_cast<uint32_t>(g), sample, n[0], n[1], n[2], n[3]);
      const int64_t j0 = 4 * g;
      const int64_t count = n_per - j0 < 4 ? n_per - j0 : 4;
      for (int64_t k = 0; k < count; ++k) {
        const int64_t i = base + j0 + k;
        const float z = a.z[i], ou = widen(pu[i]);
        const float gd = with_z ? guided_output(widen(pc[i]), ou, z, w_cond, w_uncond, w_z)
                                : guided_output(widen(pc[i]), ou, w_cond, w_uncond);
        const float x = predicted_x<kClip>(z, gd, c, a.clip);
        const float xp = prev_in != nullptr ? prev_in[i] : 0.0f;
        float scale = 0.0f, nk = 0.0f;
        if (kNoise != NoiseMode::kNone) {
          nk = kNoise == NoiseMode::kExplicit ? a.noise[i] : n[k];
          scale = read_nu ? c.noise_std * std::exp(c.noise_nu * widen(pnu[i])) : c.noise_std;
        }
        a.out[i] = step_value<kClip>(z, gd, x, ou, xp, scale, nk, c);
        if (a.x_prev != nullptr) a.x_prev[i] = x;
      }
    }
    return g1;
  }
};

void scalar_noise(const NoiseArgs& a, int64_t b, int64_t g0, int64_t g1) {
  const int64_t n_per = a.numel_per_sample;
  float* out = a.out + b * n_per;
  const auto sample = static_cast<uint32_t>(a.index_offset + static_cast<uint64_t>(b));
  for (int64_t g = g0; g < g1; ++g) {
    float n[4];
    normals4<float, uint32_t>(a.key, static_cast<uint32_t>(g), sample, n[0], n[1], n[2], n[3]);
    const int64_t j0 = 4 * g;
    const int64_t count = n_per - j0 < 4 ? n_per - j0 : 4;
    for (int64_t k = 0; k < count; ++k) out[j0 + k] = n[k];
  }
}

bool cpu_has_avx2() {
#if defined(CFGFAST_HAVE_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

Isa initial_isa() {
  Isa isa = best_isa();
  // CFGFAST_CPU_ISA=scalar|avx2 lowers the choice (never raises it past what the CPU runs).
  if (const char* env = std::getenv("CFGFAST_CPU_ISA")) {
    for (Isa cand : {Isa::kScalar, Isa::kAvx2}) {
      if (std::strcmp(env, isa_name(cand)) == 0 && isa_supported(cand)) isa = cand;
    }
  }
  return isa;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

bool isa_compiled(Isa isa) {
#if defined(CFGFAST_HAVE_AVX2)
  (void)isa;
  return true;
#else
  return isa == Isa::kScalar;
#endif
}

bool isa_supported(Isa isa) { return isa == Isa::kScalar || (isa == Isa::kAvx2 && cpu_has_avx2()); }

Isa best_isa() { return isa_supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar; }

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

void set_active_isa(Isa isa) { active_slot().store(static_cast<int>(isa), std::memory_order_relaxed); }

void step_groups(const StepArgs& args, int64_t b, int64_t g0, int64_t g1) {
  int64_t g = g0;
#if defined(CFGFAST_HAVE_AVX2)
  const int64_t full = args.numel_per_sample / 4 < g1 ? args.numel_per_sample / 4 : g1;
  const bool learned_variance = args.nu != nullptr && noise_mode(args) != NoiseMode::kNone;
  if (active_isa() == Isa::kAvx2 && !learned_variance && full > g0) g = step_groups_avx2(args, b, g0, full);
#endif
  dispatch_step<ScalarStep, int64_t>(args, b, g, g1);
}

void noise_groups(const NoiseArgs& args, int64_t b, int64_t g0, int64_t g1) {
  int64_t g = g0;
#if defined(CFGFAST_HAVE_AVX2)
  const int64_t full = args.numel_per_sample / 4 < g1 ? args.numel_per_sample / 4 : g1;
  if (active_isa() == Isa::kAvx2 && full > g0) g = noise_groups_avx2(args, b, g0, full);
#endif
  scalar_noise(args, b, g, g1);
}

}  // namespace cfgfast::cpu
