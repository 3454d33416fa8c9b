// Philox words to standard normals (SPEC §3, Box–Muller), written once for scalars and SIMD lanes.
//
// ln, sin and cos are float32 polynomials (Cephes' logf, sinf, cosf), not the libm calls, so that
// the scalar, AVX2 and CUDA builds evaluate the same formulas and agree to a few float32 ulps (not
// bit for bit: fmadd is a fused multiply-add in the SIMD and CUDA builds, a*b + c in the scalar one).
// The angle 2*pi*f is reduced exactly in fixed point: f has 24 fraction bits, so f - k/4 is exact.
#pragma once

#include "cfgfast/common.h"
#include "cfgfast/philox.h"

namespace cfgfast {

// ln(x * 2^-scale) for positive, normal float x (here x = u(word) 2^24 in [1, 2^24], scale 24).
// x = (1 + m) 2^e with 1 + m in [sqrt(1/2), sqrt(2)), split by integer arithmetic on the bits (musl's logf
// does so): adding 1 - sqrt(1/2) to the significand carries into the exponent exactly when it is at least
// sqrt(2), so e and m are exact, with no compare and select.
template <class F, class U>
CFGFAST_HOST_DEVICE F log_positive(F x, uint32_t scale = 0) {
  const U ix = float_bits(x) + (0x3f800000u - 0x3f3504f3u);
  const F e = to_float((ix >> 23) - (127u + scale));
  const F m = bits_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const F z = m * m;
  // Cephes' degree-8 polynomial, evaluated by Estrin's scheme: a shorter dependency chain than Horner.
  const F z2 = z * z;
  const F p01 = fmadd(m, F(-2.4999993993e-1f), F(3.3333331174e-1f));
  const F p23 = fmadd(m, F(-1.6668057665e-1f), F(2.0000714765e-1f));
  const F p45 = fmadd(m, F(-1.2420140846e-1f), F(1.4249322787e-1f));
  const F p67 = fmadd(m, F(-1.1514610310e-1f), F(1.1676998740e-1f));
  const F p03 = fmadd(z, p23, p01);
  const F p47 = fmadd(z, p67, p45);
  F y = fmadd(z2, fmadd(z2, F(7.0376836292e-2f), p47), p03);
  y = y * m * z;
  y = fmadd(e, F(-2.12194440e-4f), y);
  y = fmadd(z, F(-0.5f), y);
  return fmadd(e, F(0.693359375f), m + y);
}

// Box–Muller radius sqrt(-2 ln u), u(x) = ((x >> 8) + 1) * 2^-24 in (0, 1]: ln of the integer (x >> 8) + 1,
// converted exactly, scaled by 2^-24 in the exponent. kBranchFreeSqrt (scalar F only): sqrt_radius, the same
// square roots without a branch; the CUDA kernels choose it where it does not cost them spills.
template <class F, class U, bool kBranchFreeSqrt = false>
CFGFAST_HOST_DEVICE F box_muller_radius(U x) {
  const F two_ln_u = log_positive<F, U>(to_float((x >> 8) + 1u), 24) * -2.0f;
  if constexpr (kBranchFreeSqrt) {
    return sqrt_radius(two_ln_u);
  } else {
    return sqrt_rn(two_ln_u);
  }
}

// sin and cos of 2*pi*f, f(x) = (x >> 8) * 2^-24 in [0, 1).
template <class F, class U>
CFGFAST_HOST_DEVICE void sincos_turns(U x, F& s, F& c) {
  const U q = x >> 8;                    // f = q * 2^-24
  const U k = (q + (1u << 21)) >> 22;    // nearest quarter turn, 0..4
  const U r = q - (k << 22);             // f - k/4 in [-1/8, 1/8), exact (two's complement)
  const F a = to_float(r) * (6.28318530717958648f * 5.9604644775390625e-8f);  // 2*pi * 2^-24, exact scaling
  const F z = a * a;
  F sp = fmadd(z, F(-1.9515295891e-4f), F(8.3321608736e-3f));
  sp = fmadd(sp, z, F(-1.6666654611e-1f));
  const F sin_a = fmadd(sp * z, a, a);
  F cp = fmadd(z, F(2.443315711809948e-5f), F(-1.388731625493765e-3f));
  cp = fmadd(cp, z, F(4.166664568298827e-2f));
  const F cos_a = fmadd(cp * z, z, fmadd(z, F(-0.5f), F(1.0f)));
  // rotate by k quarter turns: swap on odd k, then sign flips
  const auto odd = nonzero(k & 1u);
  const F s0 = select(odd, cos_a, sin_a);
  const F c0 = select(odd, sin_a, cos_a);
  s = bits_float(float_bits(s0) ^ ((k & 2u) << 30));
  c = bits_float(float_bits(c0) ^ (((k + 1u) & 2u) << 30));
}

// Four normals from one Philox block (SPEC §3): n0 = rho0 cos, n1 = rho0 sin, n2 = rho1 cos, n3 = rho1 sin.
template <class F, class U, bool kBranchFreeSqrt = false>
CFGFAST_HOST_DEVICE void box_muller4(U x0, U x1, U x2, U x3, F& n0, F& n1, F& n2, F& n3) {
  const F rho0 = box_muller_radius<F, U, kBranchFreeSqrt>(x0);
  const F rho1 = box_muller_radius<F, U, kBranchFreeSqrt>(x2);
  F s0, c0, s1, c1;
  sincos_turns<F, U>(x1, s0, c0);
  sincos_turns<F, U>(x3, s1, c1);
  n0 = rho0 * c0;
  n1 = rho0 * s0;
  n2 = rho1 * c1;
  n3 = rho1 * s1;
}

// The counter of SPEC §3 for group g = floor(j / 4) of sample b at step t on a stream.
struct NoiseKey {
  uint32_t k0, k1;      // from the seed
  uint32_t step;        // c2
  uint32_t stream;      // c3
};

template <class F, class U, bool kBranchFreeSqrt = false>
CFGFAST_HOST_DEVICE void normals4(const PhiloxKeys& keys, uint32_t step, uint32_t stream, U group, uint32_t sample,
                                  F& n0, F& n1, F& n2, F& n3) {
  U x0 = group, x1 = U(sample), x2 = U(step), x3 = U(stream);
  philox4x32_10(x0, x1, x2, x3, keys);
  box_muller4<F, U, kBranchFreeSqrt>(x0, x1, x2, x3, n0, n1, n2, n3);
}

template <class F, class U>
CFGFAST_HOST_DEVICE void normals4(const NoiseKey& key, U group, uint32_t sample, F& n0, F& n1, F& n2, F& n3) {
  normals4<F, U>(philox_keys(key.k0, key.k1), key.step, key.stream, group, sample, n0, n1, n2, n3);
}

}  // namespace cfgfast
