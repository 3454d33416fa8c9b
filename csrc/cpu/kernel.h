// The fused CPU kernel, free of torch: the op layer (ops_cpu.cpp) checks and parallelises, the
// C++ unit tests call these functions directly.
//
// Work is cut into groups of four elements of one sample (one Philox call each, SPEC §3). Groups
// [g0, g1) of sample b cover elements 4*g0 .. min(4*g1, N) - 1 of that sample.
#pragma once

#include <cstdint>

#include "cfgfast/normal.h"
#include "cfgfast/step.h"

// The AVX2 body is compiled (with a per-file GCC target pragma, never -march) on x86-64 with GCC, and
// chosen at run time only where the CPU has AVX2, FMA and F16C. Clang ignores that pragma: scalar there.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CFGFAST_HAVE_AVX2 1
#endif

namespace cfgfast::cpu {

// Raw 16-bit storage of the two half-precision types of the model's outputs.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// Model outputs widened to float (the CUDA kernels' code, run on the host by the unit tests, finds these by
// argument-dependent lookup).
CFGFAST_HOST_DEVICE float widen(float x) { return x; }
CFGFAST_HOST_DEVICE float widen(bf16_t x) { return bf16_to_float(x.bits); }
CFGFAST_HOST_DEVICE float widen(f16_t x) { return half_to_float(x.bits); }

enum class EpsType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct StepArgs {
  float* out;
  const float* z;
  const void* pred_cond;   // o_c, of eps_type
  const void* pred_uncond; // o_u, of eps_type
  EpsType eps_type;
  const float* weights;    // [B, 2] (w_cond, w_uncond) or [B, 3] (w_cond, w_uncond, w_z) per sample
  int64_t weight_columns;  // 2 or 3
  float* x_prev;           // the multistep state (read where coef.prev != 0, written with x~), or nullptr
  const void* nu;          // learned variance, of eps_type, or nullptr
  const float* noise;      // explicit noise (C order, like z) or nullptr for the in-kernel draw
  int64_t numel_per_sample;
  StepCoef coef;
  float clip;              // used when has_clip
  bool has_clip;
  NoiseKey key;            // stream 1, t = step
  uint64_t index_offset;   // global index of sample 0
};

// Where n comes from: none at all where coef.noise_std == 0 (no Philox: a deterministic sampler's step skips
// the noise's whole cost), SPEC §3's draw, or the caller's tensor.
enum class NoiseMode : int { kNone = 0, kDrawn = 1, kExplicit = 2 };

inline NoiseMode noise_mode(const StepArgs& a) {
  if (a.coef.noise_std == 0.0f) return NoiseMode::kNone;
  return a.noise != nullptr ? NoiseMode::kExplicit : NoiseMode::kDrawn;
}

struct NoiseArgs {
  float* out;
  int64_t numel_per_sample;
  NoiseKey key;
  uint64_t index_offset;
};

// Instruction sets with a kernel; "scalar" always works, the others only where the CPU has them.
enum class Isa : int { kScalar = 0, kAvx2 = 1 };
const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);   // built into this binary
bool isa_supported(Isa isa);  // built and this CPU runs it
Isa best_isa();
Isa active_isa();
void set_active_isa(Isa isa);  // for tests and CFGFAST_CPU_ISA; caller checks isa_supported

void step_groups(const StepArgs& args, int64_t b, int64_t g0, int64_t g1);
void noise_groups(const NoiseArgs& args, int64_t b, int64_t g0, int64_t g1);

// Per-ISA entry points: they process whole vectors of complete groups from g0 on (g1 <= N / 4) and
// return the first group they left for the scalar tail. step_groups leaves calls whose noise is scaled by
// learned variance (nu) to the scalar code: its exp is std::exp, which has no bit-equal vector form.
int64_t step_groups_avx2(const StepArgs& args, int64_t b, int64_t g0, int64_t g1);
int64_t noise_groups_avx2(const NoiseArgs& args, int64_t b, int64_t g0, int64_t g1);

// Calls K<EpsT, kClip, kNoise>::run(args, rest...) for the runtime flags of args. x_prev and nu are rare
// (multistep samplers, learned variance) and uniform over a call: runtime branches, not template arguments.
template <template <class, bool, NoiseMode> class K, class R, class... A>
R dispatch_step(const StepArgs& args, A... rest) {
  const bool clip = args.has_clip;
  const NoiseMode mode = noise_mode(args);
  auto by_eps = [&](auto eps_tag) -> R {
    using E = decltype(eps_tag);
    switch (mode) {
      case NoiseMode::kNone:
        return clip ? K<E, true, NoiseMode::kNone>::run(args, rest...) : K<E, false, NoiseMode::kNone>::run(args, rest...);
      case NoiseMode::kExplicit:
        return clip ? K<E, true, NoiseMode::kExplicit>::run(args, rest...)
                    : K<E, false, NoiseMode::kExplicit>::run(args, rest...);
      default:
        return clip ? K<E, true, NoiseMode::kDrawn>::run(args, rest...) : K<E, false, NoiseMode::kDrawn>::run(args, rest...);
    }
  };
  switch (args.eps_type) {
    case EpsType::kBFloat16: return by_eps(bf16_t{});
    case EpsType::kFloat16: return by_eps(f16_t{});
    default: return by_eps(float{});
  }
}

}  // namespace cfgfast::cpu
