// Shared by every compiled backend: the host (CPU) kernels, the CUDA kernels and the C++ unit tests.
// Nothing here includes torch, so the formulas can be tested on a machine without libtorch or a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CFGFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CFGFAST_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace cfgfast {

// Scalar overloads of the few operations the templated formulas use. SIMD types provide the same
// names for their lanes (found by argument-dependent lookup), so a formula is written once and
// compiled for float, for AVX2 vectors and in CUDA.
CFGFAST_HOST_DEVICE float fmadd(float a, float b, float c) { return a * b + c; }
CFGFAST_HOST_DEVICE float select(bool m, float a, float b) { return m ? a : b; }
CFGFAST_HOST_DEVICE bool nonzero(uint32_t x) { return x != 0u; }
CFGFAST_HOST_DEVICE float to_float(uint32_t x) { return static_cast<float>(static_cast<int32_t>(x)); }

CFGFAST_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

CFGFAST_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// The correctly rounded square root
CFGFAST_HOST_DEVICE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

// Correctly rounded square root of x = +-0 or a positive normal float below 2^126, such as the Box–Muller
// radius's -2 ln u, which is -0 (u = 1) or in [1.2e-7, 33.3]. On the GPU this is __fsqrt_rn's own fast path
// (reciprocal square root, then one Newton correction: the same instructions) without its branch to a slow
// path for other inputs, whose divergence region keeps the compiler from interleaving the code around it.
CFGFAST_HOST_DEVICE float sqrt_radius(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  const float s = __fmul_rn(x, r);
  const float y = __fmaf_rn(__fmaf_rn(-s, s, x), __fmul_rn(r, 0.5f), s);
  return x == 0.0f ? x : y;  // rsqrt(+-0) is inf: +-0 itself, as sqrt gives
#else
  return sqrt_rn(x);
#endif
}

// (sample b, group g) of the flat group index task = b * groups_per_sample + g, walked in jumps of a fixed
// number of groups without a division per jump: the CUDA kernels' grid-stride loops divide once per thread
// (a division by a runtime value is ~20 instructions on the GPU, a tenth of a group's whole noise).
// 32-bit fields (two registers a cursor, not four): SPEC §3's counter words c0 = g and c1 = b are 32-bit, so
// the ops allow at most 2^32 groups a sample and 2^32 samples, and every task below the total fits.
struct GroupCursor {
  uint32_t b, g;

  static CFGFAST_HOST_DEVICE GroupCursor at(uint64_t task, uint64_t groups_per_sample) {
    const uint64_t b = task / groups_per_sample;
    return GroupCursor{static_cast<uint32_t>(b), static_cast<uint32_t>(task - b * groups_per_sample)};
  }

  // Moves forward by `jump` (itself a cursor: jump = jump.b * groups_per_sample + jump.g, jump.g < groups_per_sample);
  // last_group = groups_per_sample - 1, which fits 32 bits where groups_per_sample (up to 2^32) may not.
  CFGFAST_HOST_DEVICE void advance(const GroupCursor& jump, uint32_t last_group) {
    const uint32_t room = last_group - g;  // groups after g in this sample
    if (jump.g > room) {                   // g + jump.g >= groups_per_sample: into the next sample
      g = jump.g - room - 1u;
      b += jump.b + 1u;
    } else {
      g += jump.g;
      b += jump.b;
    }
  }
};

// clamp that propagates NaN, as torch.clamp does
CFGFAST_HOST_DEVICE float clamp_nan(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// bfloat16 and IEEE half stored as raw 16-bit words, widened exactly to float.
CFGFAST_HOST_DEVICE float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

CFGFAST_HOST_DEVICE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24, exact in float
  const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;
  return bits_float(sign | float_bits(mag));
}

}  // namespace cfgfast
