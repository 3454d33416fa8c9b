// Unit tests of the torch-free shared header (csrc/include/cfgfast) and the CPU kernel (csrc/cpu/kernel.h),
// held to SPEC §2 and the guided step of step.h (the step) and SPEC §3 (the noise) evaluated in double with
// <cmath>. No framework and no torch: the formulas that the CUDA kernels compile are tested on a machine
// without a GPU (their own per-thread code: test_cuda_on_host.cpp).
//
// Tolerances are in units of 2^-24 (half a float32 ulp at 1) times the scale of the terms that are
// rounded, so "within K" means K float32 roundings of the largest term; each test prints its worst case.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cfgfast/normal.h"
#include "cfgfast/philox.h"
#include "cfgfast/step.h"
#include "check.h"
#include "cpu/kernel.h"

namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr double kEps24 = 5.9604644775390625e-8;  // 2^-24

using cfgfast::cpu::bf16_t;
using cfgfast::cpu::EpsType;
using cfgfast::cpu::f16_t;
using cfgfast::cpu::Isa;

// splitmix64: a fixed, portable stream of test inputs.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint32_t u32() { return static_cast<uint32_t>(next() >> 32); }
  double uniform(double lo, double hi) { return lo + (hi - lo) * static_cast<double>(next() >> 11) * 0x1p-53; }
};

// ---------------------------------------------------------------- SPEC §3 in double

struct Words {
  uint32_t x[4];
};

// Philox words of one group: counter (floor(j/4), b, t, stream), key (seed mod 2^32, floor(seed/2^32)).
Words spec_words(uint64_t seed, uint32_t group, uint32_t sample, uint32_t step, uint32_t stream) {
  Words w{{group, sample, step, stream}};
  cfgfast::philox4x32_10(w.x[0], w.x[1], w.x[2], w.x[3], static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return w;
}

double spec_u(uint32_t x) { return ((x >> 8) + 1.0) * kEps24; }  // (0, 1]
double spec_f(uint32_t x) { return (x >> 8) * kEps24; }          // [0, 1)
double spec_rho(uint32_t x) { return std::sqrt(-2.0 * std::log(spec_u(x))); }

// n[k] of one group, and the radius that scales its rounding error.
void spec_normals(const Words& w, double n[4], double rho[4]) {
  const double r0 = spec_rho(w.x[0]), t0 = kTwoPi * spec_f(w.x[1]);
  const double r1 = spec_rho(w.x[2]), t1 = kTwoPi * spec_f(w.x[3]);
  n[0] = r0 * std::cos(t0);
  n[1] = r0 * std::sin(t0);
  n[2] = r1 * std::cos(t1);
  n[3] = r1 * std::sin(t1);
  rho[0] = rho[1] = r0;
  rho[2] = rho[3] = r1;
}

// ---------------------------------------------------------------- 16-bit decoding, independent of common.h

double decode_half(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  double mag;
  if (exp == 0x1f) {
    mag = man ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exp == 0) {
    mag = std::ldexp(man, -24);
  } else {
    mag = std::ldexp(1024 + man, exp - 25);
  }
  return sign ? -mag : mag;
}

double decode_bf16(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 7) & 0xff, man = h & 0x7f;
  double mag;
  if (exp == 0xff) {
    mag = man ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exp == 0) {
    mag = std::ldexp(man, -133);
  } else {
    mag = std::ldexp(128 + man, exp - 134);
  }
  return sign ? -mag : mag;
}

// for "worst error so far": NaN is worse than anything, so an unwritten or broken value is reported
bool worse(double err, double worst) { return std::isnan(err) ? !std::isnan(worst) : err > worst; }

// same value, NaN equal to NaN, and the sign of zero kept
bool same(double got, double want) {
  if (std::isnan(want)) return std::isnan(got);
  return got == want && std::signbit(got) == std::signbit(want);
}

// ---------------------------------------------------------------- SPEC §2 and the guided step in double

struct CoefD {
  double alpha, sigma, alpha_next, sigma_next, r, one_minus_r, var_small, var_large, noise_std;
};

// lam -> lam_next with variance interpolation v, with the expm1 form of 1 - r.
CoefD spec_coef(double lam, double lam_next, double v) {
  auto sigmoid = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  CoefD c{};
  c.alpha = std::sqrt(sigmoid(lam));
  c.sigma = std::sqrt(sigmoid(-lam));
  c.alpha_next = std::sqrt(sigmoid(lam_next));
  c.sigma_next = std::sqrt(sigmoid(-lam_next));
  c.r = std::exp(lam - lam_next);
  c.one_minus_r = -std::expm1(lam - lam_next);
  c.var_small = c.one_minus_r * c.sigma_next * c.sigma_next;  // posterior, sigma~^2
  c.var_large = c.one_minus_r * c.sigma * c.sigma;            // forward, sigma^2
  c.noise_std = std::sqrt(std::pow(c.var_small, 1.0 - v) * std::pow(c.var_large, v));
  return c;
}

// The StepCoef row of SPEC §2's step with an epsilon model (x~ = (z - sigma eps) / alpha), in the order of
// step.h, rounded to float once; `last`: the row of the last step, x~ itself.
cfgfast::StepCoef ddpm_row(const CoefD& c, bool last = false) {
  const auto f = [](double x) { return static_cast<float>(x); };
  const float pred_z = f(1.0 / c.alpha), pred_g = f(-c.sigma / c.alpha);
  if (last) return cfgfast::StepCoef{pred_z, pred_g, 0.0f, 1.0f, pred_z, pred_g, 0.0f, 0.0f, 0.0f, 0.0f};
  return cfgfast::StepCoef{pred_z,
                           pred_g,
                           f(c.r * c.alpha_next / c.alpha),
                           f(c.one_minus_r * c.alpha_next),
                           f(c.alpha_next / c.alpha),
                           f(-c.one_minus_r * c.alpha_next * c.sigma / c.alpha),
                           0.0f,
                           0.0f,
                           f(c.noise_std),
                           0.0f};
}

// z' of SPEC §2 from its definition (x~, then the first form of mu~), not from StepCoef.
double spec_step(const CoefD& c, double z, double eps_cond, double eps_uncond, double w, double n, bool clip,
                 double clip_value, bool last) {
  const double eps = (1.0 + w) * eps_cond - w * eps_uncond;
  double x = (z - c.sigma * eps) / c.alpha;
  if (clip) x = std::fmin(std::fmax(x, -clip_value), clip_value);
  if (last) return x;
  const double mu = c.r * (c.alpha_next / c.alpha) * z + c.one_minus_r * c.alpha_next * x;
  return mu + c.noise_std * n;
}

// One element's inputs to the guided step (the float inputs, exactly, in double).
struct Guided {
  double z, oc, ou, wc, wu, wz;  // wz: the third weight column's (0 where there is none)
  double xp;       // x~_prev (used where a state is given and prev != 0)
  double nu;       // learned variance (used where given and noise_std != 0)
  double n;        // the noise (used where noise_std != 0)
  double n_scale;  // |n|, or the Box-Muller radius of a drawn n: its own rounding's scale
};

// The step of step.h in double from the float coefficients (so their rounding is not counted), with the
// scale of each result: the sum of the magnitudes of the terms that float32 rounds.
struct GuidedWant {
  double z_next, x, z_scale, x_scale;
};

GuidedWant spec_guided(const cfgfast::StepCoef& c, const Guided& in, bool clip, double clip_value, bool with_prev,
                       bool with_nu) {
  const double g = in.wc * in.oc - in.wu * in.ou + in.wz * in.z;
  const double g_mag = std::fabs(in.wc * in.oc) + std::fabs(in.wu * in.ou) + std::fabs(in.wz * in.z);
  double x = c.pred_z * in.z + c.pred_g * g;
  const double x_mag = std::fabs(c.pred_z * in.z) + std::fabs(c.pred_g) * g_mag;
  if (clip) x = std::fmin(std::fmax(x, -clip_value), clip_value);
  double z_next = clip ? c.mean_z * in.z + c.mean_x * x : c.direct_z * in.z + c.direct_g * g;
  double mag = clip ? std::fabs(c.mean_z * in.z) + std::fabs(c.mean_x) * x_mag
                    : std::fabs(c.direct_z * in.z) + std::fabs(c.direct_g) * g_mag;
  z_next += c.uncond * in.ou;
  mag += std::fabs(c.uncond * in.ou);
  if (with_prev && c.prev != 0.0f) {
    z_next += c.prev * in.xp;
    mag += std::fabs(c.prev * in.xp);
  }
  if (c.noise_std != 0.0f) {
    const double arg = with_nu ? c.noise_nu * in.nu : 0.0;
    const double scale = c.noise_std * std::exp(arg);
    z_next += scale * in.n;
    // exp's argument rounds relative to itself: exp moves by |arg| of that, relative
    mag += std::fabs(scale) * in.n_scale * (1.0 + std::fabs(arg));
  }
  return {z_next, x, mag, x_mag};
}

// |got - want| in units of 2^-24 scale (0 where they are equal, NaN where got is NaN and want is not)
double units(double got, double want, double scale) {
  if (got == want) return 0.0;
  return std::fabs(got - want) / (kEps24 * scale);
}

// the larger error, NaN the largest (std::fmax would drop it)
double worst_of(double a, double b) { return std::isnan(a) || std::isnan(b) ? std::nan("") : std::fmax(a, b); }

// ---------------------------------------------------------------- tests

void test_philox_known_answers() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  // SPEC §3, from Random123's kat_vectors
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    uint32_t x0 = k.ctr[0], x1 = k.ctr[1], x2 = k.ctr[2], x3 = k.ctr[3];
    cfgfast::philox4x32_10<uint32_t>(x0, x1, x2, x3, k.key[0], k.key[1]);
    CHECK(x0 == k.out[0] && x1 == k.out[1] && x2 == k.out[2] && x3 == k.out[3],
          "ctr %08x.. key %08x %08x: got %08x %08x %08x %08x, want %08x %08x %08x %08x", k.ctr[0], k.key[0],
          k.key[1], x0, x1, x2, x3, k.out[0], k.out[1], k.out[2], k.out[3]);
  }
  // key (k0, k1) = (seed mod 2^32, floor(seed / 2^32))
  const uint64_t seed = 0x0123456789abcdefull;
  CHECK(cfgfast::seed_key0(seed) == 0x89abcdefu && cfgfast::seed_key1(seed) == 0x01234567u, "seed key split");
}

// ln over every u = k * 2^-24, k = 1 .. 2^24: all the inputs Box–Muller ever gives it.
void test_log_positive_exhaustive() {
  double worst = 0.0;
  uint32_t worst_k = 0;
  bool exact_at_one = true;
  for (uint32_t k = 1; k <= (1u << 24); ++k) {
    const float u = static_cast<float>(k) * 5.9604644775390625e-8f;  // exact
    const double got = cfgfast::log_positive<float, uint32_t>(u);
    const double want = std::log(static_cast<double>(u));
    if (want == 0.0) {
      exact_at_one = exact_at_one && got == 0.0;
      continue;
    }
    // error in float32 ulps of the true value
    const double ulp = std::ldexp(1.0, std::ilogb(want) - 23);
    const double err = std::fabs(got - want) / ulp;
    if (worse(err, worst)) worst = err, worst_k = k;
  }
  std::printf("  log_positive: worst %.3f ulp at u = %u * 2^-24\n", worst, worst_k);
  // Cephes logf is documented at < 1 ulp rms, 2 ulp peak in float arithmetic.
  CHECK(worst <= 2.0, "log_positive worst error %.3f ulp at u = %u * 2^-24", worst, worst_k);
  CHECK(exact_at_one, "log_positive(1) must be 0");
}

// sin/cos of 2 pi f over every f = q * 2^-24, q = 0 .. 2^24 - 1.
void test_sincos_turns_exhaustive() {
  double worst = 0.0;
  uint32_t worst_q = 0;
  for (uint32_t q = 0; q < (1u << 24); ++q) {
    const uint32_t x = (q << 8) | (q & 0xffu);  // the low 8 bits are not used
    float s, c;
    cfgfast::sincos_turns<float, uint32_t>(x, s, c);
    const double theta = kTwoPi * (q * kEps24);
    const double err = std::fmax(std::fabs(s - std::sin(theta)), std::fabs(c - std::cos(theta))) / kEps24;
    if (worse(err, worst)) worst = err, worst_q = q;
  }
  std::printf("  sincos_turns: worst %.3f * 2^-24 (absolute) at f = %u * 2^-24\n", worst, worst_q);
  // |sin|, |cos| <= 1: one float32 rounding of the result is <= 2^-24, the polynomial and the float 2*pi add ~1.
  CHECK(worst <= 3.0, "sincos_turns worst error %.3f * 2^-24 at f = %u * 2^-24", worst, worst_q);
  // the quarter turns are exact: the reduction f - k/4 is done in fixed point
  const struct {
    uint32_t q;
    float s, c;
  } quarters[] = {{0, 0.f, 1.f}, {1u << 22, 1.f, 0.f}, {2u << 22, 0.f, -1.f}, {3u << 22, -1.f, 0.f}};
  for (const auto& e : quarters) {
    float s, c;
    cfgfast::sincos_turns<float, uint32_t>(e.q << 8, s, c);
    CHECK(s == e.s && c == e.c, "sincos_turns at %u quarter turns: got (%g, %g), want (%g, %g)", e.q >> 22, s, c, e.s,
          e.c);
  }
}

// radius sqrt(-2 ln u) for every u, relative error
void test_box_muller_radius_exhaustive() {
  double worst = 0.0;
  uint32_t worst_q = 0;
  for (uint32_t q = 0; q < (1u << 24); ++q) {
    const float got = cfgfast::box_muller_radius<float, uint32_t>(q << 8);
    const double want = spec_rho(q << 8);
    if (want == 0.0) {
      CHECK(got == 0.0f, "radius at u = 1 must be 0, got %g", got);
      continue;
    }
    const double err = std::fabs(got - want) / (want * kEps24);
    if (worse(err, worst)) worst = err, worst_q = q;
  }
  std::printf("  box_muller_radius: worst relative error %.3f * 2^-24 at x >> 8 = %u\n", worst, worst_q);
  // half of ln's relative error (<= 2 ulp = 4 * 2^-24) plus the sqrt rounding (1 * 2^-24), with a margin
  CHECK(worst <= 4.0, "box_muller_radius worst relative error %.3f * 2^-24 at x >> 8 = %u", worst, worst_q);
}

// Error of float normals against SPEC §3 in double, relative to the radius: n = rho * trig, so
// |dn| <= rho * (|drho / rho| + |dtrig|) <= rho * (4 + 3) * 2^-24 by the two exhaustive tests above,
// plus one rounding of the product. 8 * 2^-24 * rho is 4 float32 ulps of rho.
constexpr double kNormalTol = 8.0;

double normal_error(float got, double want, double rho) {
  if (rho == 0.0) return got == 0.0f ? 0.0 : std::numeric_limits<double>::infinity();
  return std::fabs(got - want) / (rho * kEps24);
}

void test_box_muller4_words() {
  // extremes: u = 2^-24 (largest radius, 5.77), u = 1 (radius 0), f = 0, f = 1/2, f just below 1
  std::vector<uint32_t> words = {0x00000000u, 0x000000ffu, 0xffffffffu, 0x80000000u, 0x7fffffffu, 0x00000100u,
                                 0xffffff00u, 0x40000000u, 0xc0000000u, 0x20000000u, 0x60000000u, 0x12345678u};
  Rng rng{12345};
  for (int i = 0; i < 52; ++i) words.push_back(rng.u32());
  double worst = 0.0, worst_abs_rel = 0.0;
  uint32_t worst_a = 0, worst_b = 0;
  int worst_k = 0;
  for (uint32_t a : words) {
    for (uint32_t b : words) {
      // x0 = a, x1 = b, x2 = b, x3 = a: each word serves as a radius and as an angle
      float n[4];
      cfgfast::box_muller4<float, uint32_t>(a, b, b, a, n[0], n[1], n[2], n[3]);
      double want[4], rho[4];
      spec_normals(Words{{a, b, b, a}}, want, rho);
      for (int k = 0; k < 4; ++k) {
        const double err = normal_error(n[k], want[k], rho[k]);
        worst_abs_rel = std::fmax(worst_abs_rel, std::fabs(n[k] - want[k]) / std::fmax(1.0, std::fabs(want[k])));
        if (worse(err, worst)) worst = err, worst_a = a, worst_b = b, worst_k = k;
      }
    }
  }
  CHECK(worst <= kNormalTol, "box_muller4(%08x, %08x, %08x, %08x)[%d] off SPEC by %.2f * 2^-24 rho", worst_a, worst_b,
        worst_b, worst_a, worst_k, worst);
  // the named extremes exactly: u = 1 gives 0; f = 0 gives (rho, 0); f = 1/2 gives (-rho, 0)
  float n[4];
  cfgfast::box_muller4<float, uint32_t>(0xffffffffu, 0u, 0x00000000u, 0x80000000u, n[0], n[1], n[2], n[3]);
  const float rho_max = cfgfast::box_muller_radius<float, uint32_t>(0u);
  CHECK(n[0] == 0.0f && n[1] == 0.0f, "radius 0: got (%g, %g)", n[0], n[1]);
  CHECK(n[2] == -rho_max && n[3] == 0.0f, "half turn: got (%g, %g), want (%g, 0)", n[2], n[3], -rho_max);
  CHECK(std::fabs(rho_max - std::sqrt(48.0 * std::log(2.0))) <= 4 * kEps24 * 5.8, "largest radius %.9g", rho_max);
  std::printf("  box_muller4: %zu x %zu word pairs, worst %.3f * 2^-24 rho, worst |diff| / max(1, |n|) = %.3g\n",
              words.size(), words.size(), worst, worst_abs_rel);
}

void test_normals4_counter() {
  // normals4 = Box–Muller of the Philox block at counter (group, sample, step, stream), key from the seed
  const uint64_t seeds[] = {0ull, 42ull, 0x0123456789abcdefull, ~0ull};
  const uint32_t groups[] = {0u, 1u, 1023u, 0xffffffffu};
  const uint32_t samples[] = {0u, 7u, 0xfffffffeu};
  int failures = 0;
  double worst = 0.0;
  for (uint64_t seed : seeds) {
    for (uint32_t stream : {0u, 1u}) {
      const cfgfast::NoiseKey key{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed), 255u, stream};
      for (uint32_t g : groups) {
        for (uint32_t b : samples) {
          float n[4];
          cfgfast::normals4<float, uint32_t>(key, g, b, n[0], n[1], n[2], n[3]);
          const Words w = spec_words(seed, g, b, 255u, stream);
          float m[4];
          cfgfast::box_muller4<float, uint32_t>(w.x[0], w.x[1], w.x[2], w.x[3], m[0], m[1], m[2], m[3]);
          double want[4], rho[4];
          spec_normals(w, want, rho);
          for (int k = 0; k < 4; ++k) {
            failures += std::memcmp(&n[k], &m[k], sizeof(float)) != 0;
            const double err = normal_error(n[k], want[k], rho[k]);
            worst = std::fmax(worst, err);
            failures += !(err <= kNormalTol);
          }
        }
      }
    }
  }
  CHECK(failures == 0, "%d normals4 values differ from Box–Muller of the SPEC counter", failures);
  std::printf("  normals4: worst %.3f * 2^-24 rho\n", worst);
}

void test_half_and_bf16_widening() {
  const struct {
    uint16_t bits;
    double value;
  } halves[] = {
      {0x3c00, 1.0},          {0xc000, -2.0},       {0x7bff, 65504.0},        {0x0001, 0x1p-24},
      {0x03ff, 1023 * 0x1p-24}, {0x0400, 0x1p-14},  {0x8000, -0.0},           {0x0000, 0.0},
      {0x3555, 0x1.554p-2},   {0x7c00, INFINITY},   {0xfc00, -INFINITY},      {0x7e00, NAN},
      {0x7c01, NAN},          {0xfe00, NAN},
  };
  for (const auto& h : halves) {
    const float got = cfgfast::half_to_float(h.bits);
    CHECK(same(got, h.value), "half_to_float(0x%04x) = %a, want %a", h.bits, got, h.value);
  }
  const struct {
    uint16_t bits;
    double value;
  } bf16s[] = {
      {0x3f80, 1.0},     {0xc000, -2.0},       {0x7f7f, 0x1.fep127},  {0x0001, 0x1p-133}, {0x0080, 0x1p-126},
      {0x8000, -0.0},    {0x0000, 0.0},        {0x7f80, INFINITY},    {0xff80, -INFINITY}, {0x7fc0, NAN},
      {0x7f81, NAN},
  };
  for (const auto& h : bf16s) {
    const float got = cfgfast::bf16_to_float(h.bits);
    CHECK(same(got, h.value), "bf16_to_float(0x%04x) = %a, want %a", h.bits, got, h.value);
  }
  // every 16-bit pattern against an independent decoder
  int half_bad = 0, bf16_bad = 0;
  for (uint32_t b = 0; b <= 0xffffu; ++b) {
    half_bad += !same(cfgfast::half_to_float(static_cast<uint16_t>(b)), decode_half(static_cast<uint16_t>(b)));
    bf16_bad += !same(cfgfast::bf16_to_float(static_cast<uint16_t>(b)), decode_bf16(static_cast<uint16_t>(b)));
  }
  CHECK(half_bad == 0, "half_to_float wrong on %d of 65536 patterns", half_bad);
  CHECK(bf16_bad == 0, "bf16_to_float wrong on %d of 65536 patterns", bf16_bad);
}

// Each z' is a handful of float32 operations (widening exact; two products and a difference for g; two
// products and a sum for x~; up to five products and four sums for z', exp and a product for a learned
// scale), each rounding by <= 2^-24 of a term of the scale: <= ~12 * 2^-24 * scale, 16 with a margin.
constexpr double kStepTol = 16.0;

// The kernels' order of operations for one element, from step.h (the scalar kernel's per-element code).
template <bool kClip>
float header_step(const cfgfast::StepCoef& c, float z, float oc, float ou, float wc, float wu, float xp, float nu,
                  float n, float clip, bool with_prev, bool with_nu, float* x_out = nullptr) {
  const float g = cfgfast::guided_output(oc, ou, wc, wu);
  const float x = cfgfast::predicted_x<kClip>(z, g, c, clip);
  const float xp_used = with_prev && c.prev != 0.0f ? xp : 0.0f;
  const bool draw = c.noise_std != 0.0f;
  const float scale = !draw ? 0.0f : with_nu ? c.noise_std * std::exp(c.noise_nu * nu) : c.noise_std;
  if (x_out != nullptr) *x_out = x;
  return cfgfast::step_value<kClip>(z, g, x, ou, xp_used, scale, draw ? n : 0.0f, c);
}

float header_step(bool clip, const cfgfast::StepCoef& c, float z, float oc, float ou, float wc, float wu, float xp,
                  float nu, float n, float clip_value, bool with_prev, bool with_nu, float* x_out = nullptr) {
  return clip ? header_step<true>(c, z, oc, ou, wc, wu, xp, nu, n, clip_value, with_prev, with_nu, x_out)
              : header_step<false>(c, z, oc, ou, wc, wu, xp, nu, n, clip_value, with_prev, with_nu, x_out);
}

void test_step_hand_computed() {
  // SPEC §2's step, lam = 0, lam' = ln 3, v = 1/2:
  //   alpha^2 = sigmoid(0) = 1/2, sigma^2 = 1/2;  alpha'^2 = sigmoid(ln 3) = 3/4, sigma'^2 = 1/4;  r = e^(-ln 3) = 1/3
  //   pred_z   = 1/alpha                          = sqrt(2)                  = 1.4142135623730951
  //   pred_g   = -sigma/alpha                     = -1
  //   mean_z   = r alpha'/alpha                   = sqrt(3/2)/3              = 0.40824829046386302
  //   mean_x   = (1 - r) alpha'                   = 1/sqrt(3)                = 0.57735026918962576
  //   direct_z = alpha'/alpha                     = sqrt(3/2)                = 1.2247448713915890
  //   direct_g = -(1 - r) alpha' sigma / alpha    = -(2/3)(sqrt(3)/2)        = -0.57735026918962576
  //   sigma~^2 = (2/3)(1/4) = 1/6, sigma^2 = (2/3)(1/2) = 1/3
  //   noise_std = sqrt((1/6)^(1/2) (1/3)^(1/2)) = (1/18)^(1/4)              = 0.48549177170732342
  const CoefD cd = spec_coef(0.0, std::log(3.0), 0.5);
  const cfgfast::StepCoef c = ddpm_row(cd);
  const double hand[10] = {1.4142135623730951,  -1.0, 0.40824829046386302, 0.57735026918962576, 1.2247448713915890,
                           -0.57735026918962576, 0.0,  0.0,                 0.48549177170732342, 0.0};
  const float got_coef[10] = {c.pred_z, c.pred_g, c.mean_z, c.mean_x, c.direct_z,
                              c.direct_g, c.prev, c.uncond, c.noise_std, c.noise_nu};
  for (int i = 0; i < 10; ++i) {
    CHECK(got_coef[i] == static_cast<float>(hand[i]), "coefficient %d: %.9g, by hand %.9g", i, got_coef[i], hand[i]);
  }
  const cfgfast::StepCoef last = ddpm_row(cd, true);

  // z = 1, o_c = 1/2, o_u = 1/4, weights (3, 2) (w = 2 of the paper's Eq. 6), n = 1:  g = 3/2 - 1/2 = 1
  //   z'          = 1.2247448713915890 - 0.57735026918962576 + 0.48549177170732342      = 1.1328863739092867
  //   x~          = sqrt(2) - 1                                                         = 0.41421356237309505
  //   clip 1/4:  z' = 0.40824829046386302 + 0.57735026918962576 / 4 + 0.48549177170732342 = 1.0380776294685929
  const float g = cfgfast::guided_output(0.5f, 0.25f, 3.0f, 2.0f);
  CHECK(g == 1.0f, "guided_output = %.9g, want 1", g);
  // the generic row {1/2, -1/4, 3/4, 1/2, 2, -1, 1/8, 1/16, 1/2, 1/2}, z = 2, o_c = 1, o_u = 1/2, weights (3, 2):
  //   g = 3 - 1 = 2, x~ = 1 - 1/2 = 1/2
  //   z' = (2 2 - 2) + 1/32 + x~_prev / 8 + n / 2                    (every term exact in float)
  //   clip 1/4: x~ = 1/4, z' = (3/2 + 1/8) + 1/32 + x~_prev / 8 + n / 2
  //   learned variance, nu = ln 4: the noise's scale is 1/2 e^(ln 4 / 2) = 1
  const cfgfast::StepCoef r{0.5f, -0.25f, 0.75f, 0.5f, 2.0f, -1.0f, 0.125f, 0.0625f, 0.5f, 0.5f};
  cfgfast::StepCoef r_det = r;
  r_det.noise_std = 0.0f;
  const float ln4 = static_cast<float>(std::log(4.0));
  float x_no_clip = 0.0f, x_clip = 0.0f;
  const struct {
    const char* what;
    float got;
    double want;
    bool exact;
  } cases[] = {
      {"ddpm", header_step<false>(c, 1.0f, 0.5f, 0.25f, 3.0f, 2.0f, 0.f, 0.f, 1.0f, 0.0f, false, false),
       1.1328863739092867, false},
      {"ddpm clip 1/4", header_step<true>(c, 1.0f, 0.5f, 0.25f, 3.0f, 2.0f, 0.f, 0.f, 1.0f, 0.25f, false, false),
       1.0380776294685929, false},
      {"ddpm clip 10 (= unclipped)",
       header_step<true>(c, 1.0f, 0.5f, 0.25f, 3.0f, 2.0f, 0.f, 0.f, 1.0f, 10.0f, false, false), 1.1328863739092867,
       false},
      {"ddpm last row", header_step<false>(last, 1.0f, 0.5f, 0.25f, 3.0f, 2.0f, 0.f, 0.f, 1.0f, 0.0f, false, false),
       0.41421356237309505, false},
      {"ddpm last row clip 1/4",
       header_step<true>(last, 1.0f, 0.5f, 0.25f, 3.0f, 2.0f, 0.f, 0.f, 1.0f, 0.25f, false, false), 0.25, true},
      {"generic, x~_prev 4, n 1/2",
       header_step<false>(r, 2.0f, 1.0f, 0.5f, 3.0f, 2.0f, 4.0f, 0.f, 0.5f, 0.0f, true, false, &x_no_clip), 2.78125,
       true},
      {"generic clip 1/4, x~_prev 4, n 1/2",
       header_step<true>(r, 2.0f, 1.0f, 0.5f, 3.0f, 2.0f, 4.0f, 0.f, 0.5f, 0.25f, true, false, &x_clip), 2.40625,
       true},
      {"generic, no state, no noise",
       header_step<false>(r_det, 2.0f, 1.0f, 0.5f, 3.0f, 2.0f, 4.0f, 0.f, 0.5f, 0.0f, false, false), 2.03125, true},
      {"generic, learned variance nu = ln 4",
       header_step<false>(r, 2.0f, 1.0f, 0.5f, 3.0f, 2.0f, 4.0f, ln4, 0.5f, 0.0f, true, true), 3.03125, false},
  };
  for (const auto& e : cases) {
    // every term here is <= 4: 16 roundings of 2^-24 bound the error
    CHECK(e.exact ? e.got == e.want : std::fabs(e.got - e.want) <= kStepTol * kEps24 * 4.0,
          "%s = %.9g, by hand %.17g", e.what, e.got, e.want);
  }
  CHECK(x_no_clip == 0.5f && x_clip == 0.25f, "x~ = %.9g, clipped %.9g; by hand 0.5 and 0.25", x_no_clip, x_clip);
  // the hand value is the SPEC's own definition of the step
  const double spec = spec_step(cd, 1.0, 0.5, 0.25, 2.0, 1.0, false, 0.0, false);
  CHECK(std::fabs(spec - 1.1328863739092867) <= 1e-15, "spec_step = %.17g, by hand 1.1328863739092867", spec);
}

void test_step_formula() {
  struct Schedule {
    double lam, lam_next, v;
  };
  const Schedule schedules[] = {{-1.0, 0.5, 0.3}, {-20.0, -19.0, 0.3}, {19.5, 20.0, 0.2}, {2.0, 2.001, 0.0},
                                {-5.0, 5.0, 1.0}};
  // z, o_c, o_u, w (weights 1 + w, w), n, x~_prev, nu
  struct Input {
    double z, oc, ou, w, n, xp, nu;
  };
  const Input inputs[] = {
      {0.3, 0.1, -0.2, 1.0, 0.7, 0.4, -0.5},     {-1.7, 1.2, 0.9, 4.0, -2.1, -1.1, 2.0},
      {2.5, -0.4, -0.4, 0.0, 0.0, 3.0, 0.0},     {0.0, 3.0, -3.0, 0.5, 1.0, 0.0, -3.0},
      {1e-3, -2.0, 2.5, 7.5, 3.9, 2.5, 1.0},     {-0.25, 0.75, 0.5, -0.5, -0.33, -0.75, 0.25},
  };
  double worst = 0.0, worst_spec = 0.0;
  // SPEC §2's rows (each with its last step), then the same rows with every other term switched on
  // (multistep state, CFG++'s unconditional direction, learned variance), with and without noise
  struct Row {
    cfgfast::StepCoef c;
    const CoefD* spec;  // SPEC §2's step that the row is, or nullptr
    bool last;
  };
  std::vector<CoefD> cds;
  for (const Schedule& s : schedules) cds.push_back(spec_coef(s.lam, s.lam_next, s.v));
  std::vector<Row> rows;
  for (const CoefD& cd : cds) {
    rows.push_back({ddpm_row(cd), &cd, false});
    rows.push_back({ddpm_row(cd, true), &cd, true});
    cfgfast::StepCoef more = ddpm_row(cd);
    more.prev = -0.37f;
    more.uncond = 0.21f;
    more.noise_nu = 0.5f;
    rows.push_back({more, nullptr, false});
    more.noise_std = 0.0f;
    rows.push_back({more, nullptr, false});
  }
  Rng rng{99};
  for (int k = 0; k < 8; ++k) {
    float v[10];
    for (float& x : v) x = static_cast<float>(rng.uniform(-2.0, 2.0));
    if (k % 2) v[8] = 0.0f;
    rows.push_back({cfgfast::StepCoef{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]}, nullptr, false});
  }
  const float clip = 1.5f;
  for (const Row& row : rows) {
    const cfgfast::StepCoef& c = row.c;
    for (const Input& in : inputs) {
      const auto f = [](double x) { return static_cast<float>(x); };
      const float z = f(in.z), oc = f(in.oc), ou = f(in.ou), wc = f(1.0 + in.w), wu = f(in.w), n = f(in.n),
                  xp = f(in.xp), nu = f(in.nu);
      const Guided g{z, oc, ou, wc, wu, 0.0, xp, nu, n, std::fabs(n)};
      for (int mode = 0; mode < 8; ++mode) {
        const bool has_clip = mode & 1, with_prev = mode & 2, with_nu = mode & 4;
        float x = 0.0f;
        const float got = header_step(has_clip, c, z, oc, ou, wc, wu, xp, nu, n, clip, with_prev, with_nu, &x);
        const GuidedWant want = spec_guided(c, g, has_clip, clip, with_prev, with_nu);
        const double err = worst_of(units(got, want.z_next, want.z_scale), units(x, want.x, want.x_scale));
        worst = worse(err, worst) ? err : worst;
        CHECK(err <= kStepTol, "row (%g %g %g %g %g %g %g %g %g %g) clip %d prev %d nu %d, z %g o (%g, %g) w %g n %g "
              "x~_prev %g nu %g: z' %.9g, double %.9g; x~ %.9g, double %.9g (%.2f units)",
              c.pred_z, c.pred_g, c.mean_z, c.mean_x, c.direct_z, c.direct_g, c.prev, c.uncond, c.noise_std, c.noise_nu,
              has_clip, with_prev, with_nu, in.z, in.oc, in.ou, in.w, in.n, in.xp, in.nu, got, want.z_next, x, want.x,
              err);
        // SPEC §2's rows are SPEC §2's step: the same value from its definition (the coefficients' own float
        // rounding counted too, one unit a term)
        if (row.spec != nullptr && !with_nu) {
          const double spec = spec_step(*row.spec, z, oc, ou, wu, n, has_clip, clip, row.last);
          const double spec_err = units(got, spec, row.last ? want.x_scale : want.z_scale);
          worst_spec = worse(spec_err, worst_spec) ? spec_err : worst_spec;
          CHECK(spec_err <= kStepTol, "SPEC §2 row lam %g last %d clip %d, z %g eps (%g, %g) w %g n %g: %.9g, SPEC %.9g"
                " (%.2f units)", std::log(row.spec->alpha * row.spec->alpha / (row.spec->sigma * row.spec->sigma)),
                row.last, has_clip, in.z, in.oc, in.ou, in.w, in.n, got, spec, spec_err);
        }
      }
    }
  }
  std::printf("  step formula: worst %.3f * 2^-24 scale against the formula in double, %.3f against SPEC §2\n",
              worst, worst_spec);
}

// ---------------------------------------------------------------- the CPU kernel, scalar against AVX2

// Moderate values of each eps type as raw storage, subnormals included for the 16-bit types.
struct EpsData {
  std::vector<float> f32;
  std::vector<uint16_t> bits;
  EpsType type;
  const void* data() const { return type == EpsType::kFloat32 ? static_cast<const void*>(f32.data()) : bits.data(); }
  double at(size_t i) const {
    switch (type) {
      case EpsType::kBFloat16: return decode_bf16(bits[i]);
      case EpsType::kFloat16: return decode_half(bits[i]);
      default: return f32[i];
    }
  }
};

EpsData make_eps(EpsType type, size_t count, Rng& rng) {
  EpsData e{{}, {}, type};
  for (size_t i = 0; i < count; ++i) {
    if (type == EpsType::kFloat32) {
      e.f32.push_back(static_cast<float>(rng.uniform(-3.0, 3.0)));
    } else {
      const uint32_t r = rng.u32();
      const uint32_t sign = (r & 1u) << 15;
      if (type == EpsType::kFloat16) {
        const uint32_t exp = (r >> 1) % 17u;  // 0 (subnormal) .. 16: |eps| < 4
        e.bits.push_back(static_cast<uint16_t>(sign | (exp << 10) | ((r >> 8) & 0x3ffu)));
      } else {
        const uint32_t exp = 112u + (r >> 1) % 17u;  // 2^-15 .. |eps| < 4
        e.bits.push_back(static_cast<uint16_t>(sign | (exp << 7) | ((r >> 8) & 0x7fu)));
      }
    }
  }
  return e;
}

const char* eps_name(EpsType t) {
  return t == EpsType::kBFloat16 ? "bf16" : (t == EpsType::kFloat16 ? "f16" : "f32");
}

constexpr int64_t kGuard = 19;  // elements past the end of out that the kernel must not touch
constexpr float kGuardValue = -12345.0f;

std::vector<float> poisoned(int64_t n) {
  std::vector<float> out(static_cast<size_t>(n + kGuard), kGuardValue);
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = std::numeric_limits<float>::quiet_NaN();
  return out;
}

bool guard_intact(const std::vector<float>& out, int64_t n) {
  for (int64_t i = n; i < n + kGuard; ++i) {
    if (out[static_cast<size_t>(i)] != kGuardValue) return false;
  }
  return true;
}

// What one run of step_groups wrote: out, and the state x~_prev where one was given (its initial contents copied
// from `state`, a guard after it).
struct StepRun {
  std::vector<float> out, x_prev;
};

// Runs step_groups over every sample with the given ISA; split > 0 cuts each sample's groups in two there.
StepRun run_step(cfgfast::cpu::StepArgs args, int64_t batch, Isa isa, int64_t split,
                 const std::vector<float>* state = nullptr) {
  cfgfast::cpu::set_active_isa(isa);
  const int64_t total = batch * args.numel_per_sample;
  StepRun run{poisoned(total), {}};
  args.out = run.out.data();
  args.x_prev = nullptr;
  if (state != nullptr) {
    run.x_prev.assign(state->begin(), state->begin() + total);
    run.x_prev.resize(static_cast<size_t>(total + kGuard), kGuardValue);
    args.x_prev = run.x_prev.data();
  }
  const int64_t groups = (args.numel_per_sample + 3) / 4;
  for (int64_t b = 0; b < batch; ++b) {
    if (split > 0 && split < groups) {
      cfgfast::cpu::step_groups(args, b, split, groups);  // out of order on purpose
      cfgfast::cpu::step_groups(args, b, 0, split);
    } else {
      cfgfast::cpu::step_groups(args, b, 0, groups);
    }
  }
  return run;
}

std::vector<float> run_noise(cfgfast::cpu::NoiseArgs args, int64_t batch, Isa isa) {
  cfgfast::cpu::set_active_isa(isa);
  std::vector<float> out = poisoned(batch * args.numel_per_sample);
  args.out = out.data();
  const int64_t groups = (args.numel_per_sample + 3) / 4;
  for (int64_t b = 0; b < batch; ++b) cfgfast::cpu::noise_groups(args, b, 0, groups);
  return out;
}

const int64_t kSizes[] = {1, 7, 37, 63, 64, 65, 4097};

std::vector<Isa> isas_to_test() {
  std::vector<Isa> isas = {Isa::kScalar};
  if (cfgfast::cpu::isa_supported(Isa::kAvx2)) {
    isas.push_back(Isa::kAvx2);
  } else {
    std::printf("  AVX2 kernel: SKIPPED (%s)\n",
                cfgfast::cpu::isa_compiled(Isa::kAvx2) ? "this CPU lacks AVX2/FMA/F16C" : "not compiled in");
  }
  return isas;
}

void test_kernel_noise() {
  const std::vector<Isa> isas = isas_to_test();
  const uint64_t seeds[] = {0ull, 0x100000007ull, ~0ull};
  const uint64_t offsets[] = {0ull, 5ull, 0xfffffff0ull};
  const int64_t batch = 3;
  double worst = 0.0, worst_cross = 0.0;
  for (uint64_t seed : seeds) {
    for (uint64_t offset : offsets) {
      for (int64_t numel : kSizes) {
        const cfgfast::NoiseKey key{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed), 3u, 0u};
        const cfgfast::cpu::NoiseArgs args{nullptr, numel, key, offset};
        std::vector<std::vector<float>> outs;
        for (Isa isa : isas) {
          const std::vector<float> out = run_noise(args, batch, isa);
          int bad = 0;
          double isa_worst = 0.0;
          for (int64_t b = 0; b < batch; ++b) {
            for (int64_t j = 0; j < numel; ++j) {
              const Words w = spec_words(seed, static_cast<uint32_t>(j / 4), static_cast<uint32_t>(offset + b), 3u, 0u);
              double want[4], rho[4];
              spec_normals(w, want, rho);
              const double err = normal_error(out[static_cast<size_t>(b * numel + j)], want[j % 4], rho[j % 4]);
              isa_worst = std::fmax(isa_worst, err);
              bad += !(err <= kNormalTol);
            }
          }
          worst = std::fmax(worst, isa_worst);
          CHECK(bad == 0 && guard_intact(out, batch * numel),
                "noise_groups[%s] seed %llx offset %llu numel %lld: %d values off SPEC (worst %.2f * 2^-24 rho)%s",
                cfgfast::cpu::isa_name(isa), static_cast<unsigned long long>(seed),
                static_cast<unsigned long long>(offset), static_cast<long long>(numel), bad, isa_worst,
                guard_intact(out, batch * numel) ? "" : ", wrote past the end");
          outs.push_back(out);
        }
        // scalar against AVX2: the same words, so the same normals up to float rounding
        for (size_t k = 1; k < outs.size(); ++k) {
          for (int64_t i = 0; i < batch * numel; ++i) {
            const float a = outs[0][static_cast<size_t>(i)], v = outs[k][static_cast<size_t>(i)];
            worst_cross = std::fmax(worst_cross, std::fabs(a - v) / (kEps24 * std::fmax(std::fabs(a), 1.0)));
          }
        }
      }
    }
  }
  CHECK(worst_cross <= 2 * kNormalTol * 5.8, "scalar and AVX2 normals differ by %.2f * 2^-24 max(|n|, 1)",
        worst_cross);
  std::printf("  noise_groups: worst %.3f * 2^-24 rho against SPEC; scalar vs AVX2 worst %.3f * 2^-24 max(|n|, 1)\n",
              worst, worst_cross);

  // The noise of sample b depends on its global index only: sample b of a batch at offset 0 equals
  // sample 0 of a batch at offset b, bit for bit, for every ISA.
  for (Isa isa : isas) {
    for (int64_t numel : {int64_t{7}, int64_t{4097}}) {
      const cfgfast::NoiseKey key{cfgfast::seed_key0(99), cfgfast::seed_key1(99), 11u, 1u};
      const int64_t batch4 = 4;
      const std::vector<float> whole = run_noise({nullptr, numel, key, 0}, batch4, isa);
      int mismatches = 0;
      for (int64_t b = 0; b < batch4; ++b) {
        const std::vector<float> single = run_noise({nullptr, numel, key, static_cast<uint64_t>(b)}, 1, isa);
        mismatches += std::memcmp(single.data(), whole.data() + b * numel, sizeof(float) * numel) != 0;
      }
      CHECK(mismatches == 0, "noise_groups[%s] numel %lld: %d samples depend on their position in the batch",
            cfgfast::cpu::isa_name(isa), static_cast<long long>(numel), mismatches);
    }
  }
  cfgfast::cpu::set_active_isa(cfgfast::cpu::best_isa());
}

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  // (two empty vectors: memcmp may not be given their null data)
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
}

// Where the noise comes from, and the multistep state's four cases.
enum class NoiseCase { kNone, kDrawn, kExplicit };
enum class StateCase { kNone, kRead, kUnread, kMissing };
const char* noise_case_name(NoiseCase c) {
  return c == NoiseCase::kNone ? "none" : (c == NoiseCase::kDrawn ? "drawn" : "explicit");
}
const char* state_case_name(StateCase c) {
  switch (c) {
    case StateCase::kRead: return "read";
    case StateCase::kUnread: return "NaN-unread";
    case StateCase::kMissing: return "missing";
    default: return "none";
  }
}

// The kernel against the formula in double for every mode: clip or not; no noise (noise_std = 0: an explicit noise
// tensor of NaN is passed and must not be read), drawn or explicit noise; the state x~_prev absent, read
// (prev != 0), given but not read (prev == 0, a NaN buffer: it must not leak), or missing where prev != 0 (read as
// 0); learned variance or not; each output type, sample lengths with tails; each ISA, whole and split runs.
// Bit for bit: scalar and AVX2 where the noise is not drawn (or is scaled by nu, which runs the scalar code), and
// x~_prev always; drawn normals differ by the fused multiply-adds of the AVX2 Box-Muller (test_kernel_noise).
void test_kernel_step() {
  const std::vector<Isa> isas = isas_to_test();
  const cfgfast::StepCoef base = ddpm_row(spec_coef(-1.0, 0.5, 0.3));
  const uint64_t seed = 0x0123456789abcdefull, offset = 5;
  const uint32_t step = 17;
  const int64_t batch = 3;
  const float weights[2 * batch] = {1.0f, 0.0f, 2.5f, 1.5f, 8.25f, 7.25f};
  const float weights_z[3 * batch] = {1.0f, 0.0f, 0.5f, 2.5f, 1.5f, -0.75f, 8.25f, 7.25f, 0.25f};  // with w_z
  const float clip = 1.0f;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  double worst[2] = {0.0, 0.0}, worst_cross = 0.0;
  int combos = 0;
  Rng rng{2024};
  for (int64_t numel : kSizes) {
    const size_t total = static_cast<size_t>(batch * numel);
    std::vector<float> z(total), noise(total), state(total);
    const std::vector<float> nan_buffer(total, nan);
    for (auto& v : z) v = static_cast<float>(rng.uniform(-2.0, 2.0));
    for (auto& v : noise) v = static_cast<float>(rng.uniform(-3.0, 3.0));
    for (auto& v : state) v = static_cast<float>(rng.uniform(-2.0, 2.0));
    for (EpsType type : {EpsType::kFloat32, EpsType::kBFloat16, EpsType::kFloat16}) {
      const EpsData pc = make_eps(type, total, rng), pu = make_eps(type, total, rng), nu = make_eps(type, total, rng);
      for (NoiseCase noise_case : {NoiseCase::kNone, NoiseCase::kDrawn, NoiseCase::kExplicit}) {
        for (StateCase state_case : {StateCase::kNone, StateCase::kRead, StateCase::kUnread, StateCase::kMissing}) {
          for (int flags = 0; flags < 8; ++flags) {
            const bool has_clip = flags & 1, with_nu = flags & 2, with_z = flags & 4;
            const int64_t columns = with_z ? 3 : 2;
            const float* const w = with_z ? weights_z : weights;
            ++combos;
            cfgfast::StepCoef coef = base;
            coef.prev = state_case == StateCase::kRead || state_case == StateCase::kMissing ? 0.3f : 0.0f;
            coef.uncond = -0.05f;
            coef.noise_nu = with_nu ? 0.4f : 0.0f;
            if (noise_case == NoiseCase::kNone) coef.noise_std = 0.0f;
            const bool with_state = state_case == StateCase::kRead || state_case == StateCase::kUnread;
            const std::vector<float>* state_in = state_case == StateCase::kUnread ? &nan_buffer : &state;
            cfgfast::cpu::StepArgs args{};
            args.z = z.data();
            args.pred_cond = pc.data();
            args.pred_uncond = pu.data();
            args.eps_type = type;
            args.weights = w;
            args.weight_columns = columns;
            args.nu = with_nu ? nu.data() : nullptr;
            args.noise = noise_case == NoiseCase::kExplicit ? noise.data()
                                                            : (noise_case == NoiseCase::kNone ? nan_buffer.data() : nullptr);
            args.numel_per_sample = numel;
            args.coef = coef;
            args.clip = clip;
            args.has_clip = has_clip;
            args.key = cfgfast::NoiseKey{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed), step, 1u};
            args.index_offset = offset;

            // the formula in double from the same float inputs, with SPEC §3 noise
            std::vector<GuidedWant> want(total);
            for (int64_t b = 0; b < batch; ++b) {
              for (int64_t j = 0; j < numel; ++j) {
                const size_t i = static_cast<size_t>(b * numel + j);
                double n = noise[i], n_scale = std::fabs(noise[i]);
                if (noise_case == NoiseCase::kDrawn) {
                  double ns[4], rho[4];
                  spec_normals(spec_words(seed, static_cast<uint32_t>(j / 4), static_cast<uint32_t>(offset + b), step, 1u),
                               ns, rho);
                  n = ns[j % 4];
                  n_scale = rho[j % 4];
                }
                const Guided in{z[i], pc.at(i), pu.at(i), w[columns * b], w[columns * b + 1],
                                with_z ? w[columns * b + 2] : 0.0, (*state_in)[i], nu.at(i), n, n_scale};
                want[i] = spec_guided(coef, in, has_clip, clip, state_case == StateCase::kRead, with_nu);
              }
            }

            const bool exact_across_isas = noise_case != NoiseCase::kDrawn || with_nu;
            std::vector<StepRun> runs;
            for (Isa isa : isas) {
              // split 5: the AVX2 body starts mid-sample; split 16: at a multiple of its 16-group width
              for (int64_t split : {int64_t{0}, int64_t{5}, int64_t{16}}) {
                const StepRun run = run_step(args, batch, isa, split, with_state ? state_in : nullptr);
                int bad = 0;
                double run_worst = 0.0;
                for (size_t i = 0; i < total; ++i) {
                  double err = units(run.out[i], want[i].z_next, want[i].z_scale);
                  if (with_state) err = worst_of(err, units(run.x_prev[i], want[i].x, want[i].x_scale));
                  run_worst = worse(err, run_worst) ? err : run_worst;
                  bad += !(err <= kStepTol);  // NaN (an unwritten element, a leaked NaN) counts as bad
                }
                const bool guards = guard_intact(run.out, static_cast<int64_t>(total)) &&
                                    (!with_state || guard_intact(run.x_prev, static_cast<int64_t>(total)));
                worst[isa == Isa::kAvx2] = worse(run_worst, worst[isa == Isa::kAvx2]) ? run_worst : worst[isa == Isa::kAvx2];
                CHECK(bad == 0 && guards,
                      "step_groups[%s] %s numel %lld clip %d noise %s state %s nu %d w_z %d split %lld: %d values off "
                      "the formula (worst %.2f)%s",
                      cfgfast::cpu::isa_name(isa), eps_name(type), static_cast<long long>(numel), has_clip,
                      noise_case_name(noise_case), state_case_name(state_case), with_nu, with_z,
                      static_cast<long long>(split),
                      bad, run_worst, guards ? "" : ", wrote past the end");
                if (split == 0) {
                  runs.push_back(run);
                } else if (isa == Isa::kScalar || split % 16 == 0 || exact_across_isas) {
                  // Splitting a sample's groups changes nothing, bit for bit, unless it moves drawn normals between
                  // the AVX2 body and the scalar tail: then they are only both within SPEC.
                  CHECK(bits_equal(run.out, runs.back().out) && bits_equal(run.x_prev, runs.back().x_prev),
                        "step_groups[%s] %s numel %lld noise %s: a run split at group %lld differs from the whole run",
                        cfgfast::cpu::isa_name(isa), eps_name(type), static_cast<long long>(numel),
                        noise_case_name(noise_case), static_cast<long long>(split));
                }
              }
            }
            for (size_t k = 1; k < runs.size(); ++k) {
              CHECK(bits_equal(runs[0].x_prev, runs[k].x_prev), "%s: x~_prev of scalar and AVX2 differ",
                    eps_name(type));
              if (exact_across_isas) {
                CHECK(bits_equal(runs[0].out, runs[k].out),
                      "step_groups %s numel %lld clip %d noise %s state %s nu %d w_z %d: scalar and AVX2 differ",
                      eps_name(type), static_cast<long long>(numel), has_clip, noise_case_name(noise_case),
                      state_case_name(state_case), with_nu, with_z);
              } else {
                for (size_t i = 0; i < total; ++i) {
                  const double d = units(runs[0].out[i], runs[k].out[i], want[i].z_scale);
                  worst_cross = worse(d, worst_cross) ? d : worst_cross;
                }
              }
            }
          }
        }
      }
    }
  }
  CHECK(worst_cross <= 2 * kStepTol, "scalar and AVX2 steps with drawn noise differ by %.2f * 2^-24 scale", worst_cross);
  std::printf("  step_groups: %d cases; worst %.3f (scalar), %.3f (AVX2) * 2^-24 scale against the formula; "
              "scalar vs AVX2 with drawn noise %.3f, bit for bit otherwise\n",
              combos, worst[0], worst[1], worst_cross);

  const int64_t numel = 4097;
  const size_t total = static_cast<size_t>(batch * numel);
  const std::vector<float> zeros(total, 0.0f);
  std::vector<float> z(total), oc(total), ou(total);
  for (size_t i = 0; i < total; ++i) {
    z[i] = static_cast<float>(rng.uniform(-2.0, 2.0));
    oc[i] = static_cast<float>(rng.uniform(-2.0, 2.0));
    ou[i] = static_cast<float>(rng.uniform(-2.0, 2.0));
  }
  cfgfast::cpu::StepArgs plain{};
  plain.z = z.data();
  plain.pred_cond = oc.data();
  plain.pred_uncond = ou.data();
  plain.eps_type = EpsType::kFloat32;
  plain.weights = weights;
  plain.weight_columns = 2;
  plain.numel_per_sample = numel;
  plain.coef = base;
  plain.key = cfgfast::NoiseKey{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed), step, 1u};
  plain.index_offset = offset;
  for (Isa isa : isas) {
    // The step's own draw is SPEC §3 stream 1 at t = step: with every coefficient 0 but noise_std = 1 the step
    // returns its noise, equal bit for bit to noise_groups (same ISA).
    cfgfast::cpu::StepArgs args = plain;
    args.z = zeros.data();
    args.pred_cond = args.pred_uncond = zeros.data();
    args.coef = cfgfast::StepCoef{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 1.0f, 0.f};
    const StepRun stepped = run_step(args, batch, isa, 0);
    const std::vector<float> drawn = run_noise({nullptr, numel, args.key, offset}, batch, isa);
    CHECK(bits_equal(stepped.out, drawn), "step_groups[%s] noise differs from noise_groups(stream 1, t = step)",
          cfgfast::cpu::isa_name(isa));

    // noise_std = 0 draws nothing: the seed, the step and an explicit noise or nu (NaN) change nothing
    args = plain;
    args.coef.noise_std = 0.0f;
    args.coef.noise_nu = 1.0f;
    const StepRun deterministic = run_step(args, batch, isa, 0);
    const std::vector<float> nans(total, std::numeric_limits<float>::quiet_NaN());
    args.key = cfgfast::NoiseKey{cfgfast::seed_key0(~seed), cfgfast::seed_key1(~seed), step + 1, 1u};
    const StepRun other_seed = run_step(args, batch, isa, 0);
    args.noise = nans.data();
    args.nu = nans.data();
    const StepRun with_nans = run_step(args, batch, isa, 0);
    int nan_count = 0;
    for (size_t i = 0; i < total; ++i) nan_count += std::isnan(deterministic.out[i]);
    CHECK(nan_count == 0 && bits_equal(deterministic.out, other_seed.out) && bits_equal(deterministic.out, with_nans.out),
          "step_groups[%s] with noise_std = 0 depends on the seed, the noise or nu (%d NaNs)",
          cfgfast::cpu::isa_name(isa), nan_count);
    // (and with noise, the seed matters: the comparison above can fail)
    args = plain;
    const StepRun noisy = run_step(args, batch, isa, 0);
    args.key = cfgfast::NoiseKey{cfgfast::seed_key0(~seed), cfgfast::seed_key1(~seed), step, 1u};
    CHECK(!bits_equal(noisy.out, run_step(args, batch, isa, 0).out), "step_groups[%s]: the seed changes nothing",
          cfgfast::cpu::isa_name(isa));

    // the last step's row returns x~ itself, the value it writes into the state
    for (bool has_clip : {false, true}) {
      args = plain;
      args.coef = ddpm_row(spec_coef(-1.0, 0.5, 0.3), true);
      args.has_clip = has_clip;
      args.clip = 1.0f;
      const StepRun last = run_step(args, batch, isa, 0, &zeros);
      int differ = 0;
      for (size_t i = 0; i < total; ++i) differ += !(last.out[i] == last.x_prev[i]);
      CHECK(differ == 0, "step_groups[%s] last row clip %d: %d elements differ from x~", cfgfast::cpu::isa_name(isa),
            has_clip, differ);
    }
  }

  // NaN in the model's output propagates through the clip (torch.clamp does), in every ISA
  for (Isa isa : isas) {
    const int64_t n64 = 64;
    std::vector<float> zs(static_cast<size_t>(n64), 0.5f), ocs(zs.size(), 0.1f), ous(zs.size(), 0.2f);
    ocs[3] = ocs[40] = std::numeric_limits<float>::quiet_NaN();
    cfgfast::cpu::StepArgs args = plain;
    args.z = zs.data();
    args.pred_cond = ocs.data();
    args.pred_uncond = ous.data();
    args.numel_per_sample = n64;
    args.clip = clip;
    args.has_clip = true;
    for (bool last : {false, true}) {
      args.coef = ddpm_row(spec_coef(-1.0, 0.5, 0.3), last);
      const StepRun run = run_step(args, 1, isa, 0, &zs);
      int nans = 0, state_nans = 0;
      for (int64_t i = 0; i < n64; ++i) {
        nans += std::isnan(run.out[static_cast<size_t>(i)]);
        state_nans += std::isnan(run.x_prev[static_cast<size_t>(i)]);
      }
      CHECK(std::isnan(run.out[3]) && std::isnan(run.out[40]) && nans == 2 && state_nans == 2,
            "step_groups[%s] clip last %d: NaN output gave %d NaNs (%d in x~)", cfgfast::cpu::isa_name(isa), last, nans,
            state_nans);
    }
  }
  cfgfast::cpu::set_active_isa(cfgfast::cpu::best_isa());
}

// GroupCursor (the CUDA kernels' grid-stride walk over (sample, group)) against a division at every jump,
// for sample lengths from one group to 2^32 groups (the most SPEC's checks allow) and jumps shorter and
// longer than a sample.
void test_group_cursor() {
  Rng rng{17};
  const uint64_t lengths[] = {1, 2, 3, 7, 16, 192, 3072, 12289, 1ull << 20, (1ull << 32) - 1, 1ull << 32};
  int worst_steps = 0;
  for (const uint64_t per_sample : lengths) {
    const uint64_t jumps[] = {1, 3, per_sample, per_sample + 1, 2 * per_sample - 1, 67584, 135168, 256 * 132 * 8 + 5};
    for (const uint64_t jump_size : jumps) {
      const uint64_t starts[] = {0, jump_size - 1, per_sample - 1, rng.next() % (jump_size + per_sample)};
      for (const uint64_t start : starts) {
        cfgfast::GroupCursor at = cfgfast::GroupCursor::at(start, per_sample);
        const cfgfast::GroupCursor jump = cfgfast::GroupCursor::at(jump_size, per_sample);
        bool ok = true;
        uint64_t task = start;
        int steps = 0;
        for (; steps < 300; ++steps, task += jump_size, at.advance(jump, static_cast<uint32_t>(per_sample - 1))) {
          if (at.b != task / per_sample || at.g != task % per_sample) {
            ok = false;
            break;
          }
        }
        worst_steps = steps > worst_steps ? steps : worst_steps;
        CHECK(ok, "groups per sample %llu, jump %llu, start %llu: wrong at task %llu (b %llu g %llu)",
              (unsigned long long)per_sample, (unsigned long long)jump_size, (unsigned long long)start,
              (unsigned long long)task, (unsigned long long)at.b, (unsigned long long)at.g);
      }
    }
  }
  std::printf("  %d jumps per walk checked\n", worst_steps);
}

}  // namespace

// test_shared_header [NAME ...]: the tests named (all without names); the sanitized build runs the kernels' tests
// only (the exhaustive ones would take minutes there).
int main(int argc, char** argv) {
  const TestCase tests[] = {
      {"philox_known_answers", test_philox_known_answers},
      {"log_positive_exhaustive", test_log_positive_exhaustive},
      {"sincos_turns_exhaustive", test_sincos_turns_exhaustive},
      {"box_muller_radius_exhaustive", test_box_muller_radius_exhaustive},
      {"box_muller4_words", test_box_muller4_words},
      {"normals4_counter", test_normals4_counter},
      {"half_and_bf16_widening", test_half_and_bf16_widening},
      {"step_hand_computed", test_step_hand_computed},
      {"step_formula", test_step_formula},
      {"kernel_noise", test_kernel_noise},
      {"kernel_step", test_kernel_step},
      {"group_cursor", test_group_cursor},
  };
  std::printf("cpu isa: best %s\n", cfgfast::cpu::isa_name(cfgfast::cpu::best_isa()));
  return run_tests(tests, argc, argv);
}
