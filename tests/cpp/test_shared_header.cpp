// Unit tests of the torch-free shared header (csrc/include/cfgfast) and the CPU kernel (csrc/cpu/kernel.h),
// held to SPEC §2 (the step) and §3 (the noise) evaluated in double with <cmath>, and of the CUDA kernels' own
// code (csrc/cuda/step_kernel.h) run thread by thread on the CPU. No framework and no torch: this is how the
// code that the CUDA kernels compile is tested on a machine without a GPU.
//
// Tolerances are in units of 2^-24 (half a float32 ulp at 1) times the scale of the terms that are
// rounded, so "within K" means K float32 roundings of the largest term; each test prints its worst case.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "cfgfast/normal.h"
#include "cfgfast/philox.h"
#include "cfgfast/step.h"
#include "cpu/kernel.h"
#include "cuda/step_kernel.h"

namespace {

int g_passed = 0;
int g_failed = 0;

// CHECK(condition, printf-style context): counts, and prints the failures only.
#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (cond) {                                               \
      ++g_passed;                                             \
    } else {                                                  \
      ++g_failed;                                             \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                               \
      std::printf("\n");                                      \
    }                                                         \
  } while (0)

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

// ---------------------------------------------------------------- SPEC §2 in double

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

// StepCoef in the order of step.h, rounded to float once.
cfgfast::StepCoef to_step_coef(const CoefD& c) {
  return cfgfast::StepCoef{static_cast<float>(c.alpha),
                           static_cast<float>(c.sigma),
                           static_cast<float>(c.alpha_next / c.alpha),
                           static_cast<float>(c.one_minus_r * c.alpha_next * c.sigma / c.alpha),
                           static_cast<float>(c.r * c.alpha_next / c.alpha),
                           static_cast<float>(c.one_minus_r * c.alpha_next),
                           static_cast<float>(c.noise_std)};
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

// Error of a float z' against spec_step, in units of 2^-24 times the terms it is made of.
struct StepInput {
  double z, eps_cond, eps_uncond, w, n;
};

double step_scale(const cfgfast::StepCoef& c, const StepInput& in, double noise_scale, bool clip, bool last) {
  const double eps_mag = std::fabs((1.0 + in.w) * in.eps_cond) + std::fabs(in.w * in.eps_uncond);
  const double x_mag = (std::fabs(in.z) + c.sigma * eps_mag) / c.alpha;
  if (last) return x_mag;
  if (clip) return std::fabs(c.mean_z_clip * in.z) + c.mean_x_clip * x_mag + c.noise_std * noise_scale;
  return std::fabs(c.mean_z * in.z) + c.mean_eps * eps_mag + c.noise_std * noise_scale;
}

// Each z' is a handful of float32 operations (widening exact; 1 + w, two products and a difference for
// eps~; then up to three products, two sums and a division), each rounding by <= 2^-24 of a term of the
// scale, plus the float rounding of the seven coefficients: <= ~12 * 2^-24 * scale, 16 with a margin.
constexpr double kStepTol = 16.0;

void test_step_hand_computed() {
  // lam = 0, lam' = ln 3, v = 1/2:
  //   alpha^2 = sigmoid(0) = 1/2, sigma^2 = 1/2;  alpha'^2 = sigmoid(ln 3) = 3/4, sigma'^2 = 1/4;  r = e^(-ln 3) = 1/3
  //   mean_z      = alpha'/alpha                     = sqrt(3/2)                 = 1.2247448713915890
  //   mean_eps    = (1 - r) alpha' sigma / alpha     = (2/3)(sqrt(3)/2)          = 1/sqrt(3) = 0.57735026918962576
  //   mean_z_clip = r alpha'/alpha                   = sqrt(3/2)/3               = 0.40824829046386302
  //   mean_x_clip = (1 - r) alpha'                   = 1/sqrt(3)                 = 0.57735026918962576
  //   sigma~^2 = (2/3)(1/4) = 1/6, sigma^2 = (2/3)(1/2) = 1/3
  //   noise_std = sqrt((1/6)^(1/2) (1/3)^(1/2)) = (1/18)^(1/4)                    = 0.48549177170732342
  const double lam = 0.0, lam_next = std::log(3.0), v = 0.5;
  const CoefD cd = spec_coef(lam, lam_next, v);
  const cfgfast::StepCoef c = to_step_coef(cd);
  const double hand[7] = {std::sqrt(0.5), std::sqrt(0.5), 1.2247448713915890, 0.57735026918962576,
                          0.40824829046386302, 0.57735026918962576, 0.48549177170732342};
  const float got_coef[7] = {c.alpha, c.sigma, c.mean_z, c.mean_eps, c.mean_z_clip, c.mean_x_clip, c.noise_std};
  for (int i = 0; i < 7; ++i) {
    CHECK(got_coef[i] == static_cast<float>(hand[i]), "coefficient %d: %.9g, by hand %.9g", i, got_coef[i], hand[i]);
  }

  // z = 1, eps_c = 1/2, eps_u = 1/4, w = 2, n = 1:  eps~ = 3 * 1/2 - 2 * 1/4 = 1
  //   z'          = 1.2247448713915890 * 1 - 0.57735026918962576 * 1 + 0.48549177170732342 * 1 = 1.1328863739092867
  //   x~          = (1 - sqrt(1/2) * 1) / sqrt(1/2) = sqrt(2) - 1                             = 0.41421356237309505
  //   clip 1/4:  z' = 0.40824829046386302 * 1 + 0.57735026918962576 * 1/4 + 0.48549177170732342 = 1.0380776294685929
  const float eps = cfgfast::guided_eps(0.5f, 0.25f, 3.0f, 2.0f);
  CHECK(eps == 1.0f, "guided_eps = %.9g, want 1", eps);
  const struct {
    const char* what;
    float got;
    double want;
  } cases[] = {
      {"step_value<false>", cfgfast::step_value<false>(1.0f, eps, 1.0f, c, 0.0f), 1.1328863739092867},
      {"step_value<true> clip 1/4", cfgfast::step_value<true>(1.0f, eps, 1.0f, c, 0.25f), 1.0380776294685929},
      {"step_value<true> clip 10 (= unclipped)", cfgfast::step_value<true>(1.0f, eps, 1.0f, c, 10.0f),
       1.1328863739092867},
      {"last_value<false>", cfgfast::last_value<false>(1.0f, eps, c, 0.0f), 0.41421356237309505},
      {"last_value<true> clip 1/4", cfgfast::last_value<true>(1.0f, eps, c, 0.25f), 0.25},
  };
  for (const auto& e : cases) {
    // every term here is <= 1.3: 16 roundings of 2^-24 bound the error
    CHECK(std::fabs(e.got - e.want) <= kStepTol * kEps24 * 1.3, "%s = %.9g, by hand %.17g", e.what, e.got, e.want);
    // the hand value is the SPEC's own definition of the step
  }
  const double spec = spec_step(cd, 1.0, 0.5, 0.25, 2.0, 1.0, false, 0.0, false);
  CHECK(std::fabs(spec - 1.1328863739092867) <= 1e-15, "spec_step = %.17g, by hand 1.1328863739092867", spec);
}

void test_step_formula() {
  struct Schedule {
    double lam, lam_next, v;
  };
  const Schedule schedules[] = {{-1.0, 0.5, 0.3}, {-20.0, -19.0, 0.3}, {19.5, 20.0, 0.2}, {2.0, 2.001, 0.0},
                                {-5.0, 5.0, 1.0}};
  const StepInput inputs[] = {
      {0.3, 0.1, -0.2, 1.0, 0.7},  {-1.7, 1.2, 0.9, 4.0, -2.1}, {2.5, -0.4, -0.4, 0.0, 0.0},
      {0.0, 3.0, -3.0, 0.5, 1.0},  {1e-3, -2.0, 2.5, 7.5, 3.9}, {-0.25, 0.75, 0.5, -0.5, -0.33},
  };
  double worst = 0.0;
  for (const Schedule& s : schedules) {
    const CoefD cd = spec_coef(s.lam, s.lam_next, s.v);
    const cfgfast::StepCoef c = to_step_coef(cd);
    for (const StepInput& in : inputs) {
      const float eps = cfgfast::guided_eps(static_cast<float>(in.eps_cond), static_cast<float>(in.eps_uncond),
                                            static_cast<float>(1.0 + in.w), static_cast<float>(in.w));
      const float z = static_cast<float>(in.z), n = static_cast<float>(in.n);
      const float clip = 1.5f;
      const struct {
        const char* what;
        float got;
        bool clip, last;
      } forms[] = {
          {"step_value<false>", cfgfast::step_value<false>(z, eps, n, c, clip), false, false},
          {"step_value<true>", cfgfast::step_value<true>(z, eps, n, c, clip), true, false},
          {"last_value<false>", cfgfast::last_value<false>(z, eps, c, clip), false, true},
          {"last_value<true>", cfgfast::last_value<true>(z, eps, c, clip), true, true},
      };
      for (const auto& f : forms) {
        const double want = spec_step(cd, in.z, in.eps_cond, in.eps_uncond, in.w, in.n, f.clip, clip, f.last);
        const double err = std::fabs(f.got - want) / (kEps24 * step_scale(c, in, std::fabs(in.n), f.clip, f.last));
        worst = std::fmax(worst, err);
        CHECK(err <= kStepTol, "%s lam %g -> %g v %g, z %g eps (%g, %g) w %g n %g: %.9g, SPEC %.9g (%.2f units)",
              f.what, s.lam, s.lam_next, s.v, in.z, in.eps_cond, in.eps_uncond, in.w, in.n, f.got, want, err);
      }
    }
  }
  std::printf("  step formula: worst %.3f * 2^-24 scale\n", worst);
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

// Runs step_groups over every sample with the given ISA; split > 0 cuts each sample's groups in two there.
std::vector<float> run_step(cfgfast::cpu::StepArgs args, int64_t batch, Isa isa, int64_t split) {
  cfgfast::cpu::set_active_isa(isa);
  std::vector<float> out = poisoned(batch * args.numel_per_sample);
  args.out = out.data();
  const int64_t groups = (args.numel_per_sample + 3) / 4;
  for (int64_t b = 0; b < batch; ++b) {
    if (split > 0 && split < groups) {
      cfgfast::cpu::step_groups(args, b, split, groups);  // out of order on purpose
      cfgfast::cpu::step_groups(args, b, 0, split);
    } else {
      cfgfast::cpu::step_groups(args, b, 0, groups);
    }
  }
  return out;
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

void test_kernel_step() {
  const std::vector<Isa> isas = isas_to_test();
  const CoefD cd = spec_coef(-1.0, 0.5, 0.3);
  const cfgfast::StepCoef coef = to_step_coef(cd);
  const uint64_t seed = 0x0123456789abcdefull, offset = 5;
  const uint32_t step = 17;
  const int64_t batch = 3;
  const float w[batch] = {0.0f, 1.5f, 7.25f};
  const float clip = 1.0f;
  double worst[2] = {0.0, 0.0}, worst_cross = 0.0;
  int combos = 0;
  Rng rng{2024};
  for (int64_t numel : kSizes) {
    const size_t total = static_cast<size_t>(batch * numel);
    std::vector<float> z(total), noise(total);
    for (auto& v : z) v = static_cast<float>(rng.uniform(-2.0, 2.0));
    for (auto& v : noise) v = static_cast<float>(rng.uniform(-3.0, 3.0));
    for (EpsType type : {EpsType::kFloat32, EpsType::kBFloat16, EpsType::kFloat16}) {
      const EpsData ec = make_eps(type, total, rng), eu = make_eps(type, total, rng);
      for (int flags = 0; flags < 8; ++flags) {
        const bool has_clip = flags & 1, last = flags & 2, explicit_noise = flags & 4;
        if (last && explicit_noise) continue;  // the last step draws no noise
        ++combos;
        cfgfast::cpu::StepArgs args{};
        args.z = z.data();
        args.eps_cond = ec.data();
        args.eps_uncond = eu.data();
        args.eps_type = type;
        args.w = w;
        args.noise = explicit_noise ? noise.data() : nullptr;
        args.numel_per_sample = numel;
        args.coef = coef;
        args.clip = clip;
        args.has_clip = has_clip;
        args.last = last;
        args.key = cfgfast::NoiseKey{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed), step, 1u};
        args.index_offset = offset;

        // SPEC §2 in double from the same float inputs, with SPEC §3 noise
        std::vector<double> want(total), scale(total);
        for (int64_t b = 0; b < batch; ++b) {
          for (int64_t j = 0; j < numel; ++j) {
            const size_t i = static_cast<size_t>(b * numel + j);
            double n = noise[i], noise_scale = std::fabs(noise[i]);
            if (!explicit_noise) {
              double ns[4], rho[4];
              spec_normals(spec_words(seed, static_cast<uint32_t>(j / 4), static_cast<uint32_t>(offset + b), step, 1u),
                           ns, rho);
              n = ns[j % 4];
              noise_scale = rho[j % 4];
            }
            const StepInput in{z[i], ec.at(i), eu.at(i), w[b], n};
            want[i] = spec_step(cd, in.z, in.eps_cond, in.eps_uncond, in.w, in.n, has_clip, clip, last);
            scale[i] = step_scale(coef, in, noise_scale, has_clip, last);
          }
        }

        std::vector<std::vector<float>> outs;
        for (Isa isa : isas) {
          // split 5: the AVX2 body starts mid-sample; split 16: at a multiple of its 16-group width
          for (int64_t split : {int64_t{0}, int64_t{5}, int64_t{16}}) {
            const std::vector<float> out = run_step(args, batch, isa, split);
            int bad = 0;
            double run_worst = 0.0;
            for (size_t i = 0; i < total; ++i) {
              const double err = std::fabs(out[i] - want[i]) / (kEps24 * scale[i]);
              run_worst = std::fmax(run_worst, err);
              bad += !(err <= kStepTol);  // NaN (an unwritten element) counts as bad
            }
            worst[isa == Isa::kAvx2] = std::fmax(worst[isa == Isa::kAvx2], run_worst);
            CHECK(bad == 0 && guard_intact(out, static_cast<int64_t>(total)),
                  "step_groups[%s] %s numel %lld clip %d last %d noise %s split %lld: %d values off SPEC (worst %.2f)%s",
                  cfgfast::cpu::isa_name(isa), eps_name(type), static_cast<long long>(numel), has_clip, last,
                  explicit_noise ? "explicit" : "drawn", static_cast<long long>(split), bad, run_worst,
                  guard_intact(out, static_cast<int64_t>(total)) ? "" : ", wrote past the end");
            if (split == 0) {
              outs.push_back(out);
            } else if (isa == Isa::kScalar || split % 16 == 0) {
              // Splitting a sample's groups changes nothing, bit for bit, unless it moves elements between
              // the AVX2 body (FMA-contracted) and the scalar tail: then they are only both within SPEC.
              CHECK(std::memcmp(out.data(), outs.back().data(), sizeof(float) * total) == 0,
                    "step_groups[%s] %s numel %lld: a run split at group %lld differs from the whole run",
                    cfgfast::cpu::isa_name(isa), eps_name(type), static_cast<long long>(numel),
                    static_cast<long long>(split));
            }
          }
        }
        for (size_t k = 1; k < outs.size(); ++k) {
          for (size_t i = 0; i < total; ++i) {
            worst_cross = std::fmax(worst_cross, std::fabs(outs[0][i] - outs[k][i]) / (kEps24 * scale[i]));
          }
        }
      }
    }
  }
  CHECK(worst_cross <= 2 * kStepTol, "scalar and AVX2 steps differ by %.2f * 2^-24 scale", worst_cross);
  std::printf("  step_groups: %d cases; worst %.3f (scalar), %.3f (AVX2) * 2^-24 scale against SPEC; "
              "scalar vs AVX2 %.3f\n",
              combos, worst[0], worst[1], worst_cross);

  // The step's own draw is SPEC §3 stream 1 at t = step: with z = eps = 0 and noise_std = 1 the step
  // returns its noise, equal bit for bit to noise_groups (same ISA).
  for (Isa isa : isas) {
    const int64_t numel = 4097;
    const std::vector<float> zeros(static_cast<size_t>(batch * numel), 0.0f);
    cfgfast::cpu::StepArgs args{};
    args.z = zeros.data();
    args.eps_cond = zeros.data();
    args.eps_uncond = zeros.data();
    args.eps_type = EpsType::kFloat32;
    args.w = w;
    args.numel_per_sample = numel;
    args.coef = cfgfast::StepCoef{1.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 1.0f};
    args.key = cfgfast::NoiseKey{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed), step, 1u};
    args.index_offset = offset;
    const std::vector<float> stepped = run_step(args, batch, isa, 0);
    const std::vector<float> drawn = run_noise({nullptr, numel, args.key, offset}, batch, isa);
    CHECK(std::memcmp(stepped.data(), drawn.data(), sizeof(float) * batch * numel) == 0,
          "step_groups[%s] noise differs from noise_groups(stream 1, t = step)", cfgfast::cpu::isa_name(isa));
  }

  // NaN in eps propagates through the clip (torch.clamp does), in every ISA
  for (Isa isa : isas) {
    const int64_t numel = 64;
    std::vector<float> zs(static_cast<size_t>(numel), 0.5f), ecs(zs.size(), 0.1f), eus(zs.size(), 0.2f);
    ecs[3] = ecs[40] = std::numeric_limits<float>::quiet_NaN();
    cfgfast::cpu::StepArgs args{};
    args.z = zs.data();
    args.eps_cond = ecs.data();
    args.eps_uncond = eus.data();
    args.eps_type = EpsType::kFloat32;
    args.w = w;
    args.numel_per_sample = numel;
    args.coef = coef;
    args.clip = clip;
    args.has_clip = true;
    args.key = cfgfast::NoiseKey{1u, 2u, 3u, 1u};
    for (bool last : {false, true}) {
      args.last = last;
      const std::vector<float> out = run_step(args, 1, isa, 0);
      int nans = 0;
      for (int64_t i = 0; i < numel; ++i) nans += std::isnan(out[static_cast<size_t>(i)]);
      CHECK(std::isnan(out[3]) && std::isnan(out[40]) && nans == 2, "step_groups[%s] clip last %d: NaN eps gave %d NaNs",
            cfgfast::cpu::isa_name(isa), last, nans);
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

// ---------------------------------------------------------------- the CUDA kernels' threads, run on the CPU

// Exactly `bytes` bytes starting at a 16-byte boundary (AddressSanitizer knows where they end), whatever alignment
// the allocator gives a std::vector.
struct Aligned16 {
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{16}); }
  };
  std::unique_ptr<unsigned char[], Free> mem;
  explicit Aligned16(size_t bytes)
      : mem(static_cast<unsigned char*>(::operator new[](bytes, std::align_val_t{16}))) {}
};

// `count` values of `size` bytes copied `shift` values after a 16-byte boundary, in a buffer that ends right after
// them: a read past the end is a read outside the buffer (the sanitized build stops at it).
struct Placed {
  Aligned16 buf;
  const void* at;
  Placed(const void* src, size_t size, int64_t count, int shift)
      : buf(size * static_cast<size_t>(count + shift)), at(buf.mem.get() + size * static_cast<size_t>(shift)) {
    std::memcpy(buf.mem.get() + size * static_cast<size_t>(shift), src, size * static_cast<size_t>(count));
  }
};

// Every thread of a grid of `threads` threads of the CUDA step kernel (csrc/cuda/step_kernel.h), one after another:
// the threads write disjoint groups, so their order does not matter.
// prefetch_rounds > 0 (vectorised path): the kernels with the L2 prefetch, set up as step_cuda.cu does.
template <class EpsT>
void run_step_grid(cfgfast::DeviceStepArgs a, bool vec, int groups, uint64_t threads, uint32_t prefetch_rounds) {
  cfgfast::set_prefetch(a, prefetch_rounds, groups, threads);
  for (uint64_t t = 0; t < threads; ++t) {
    if (prefetch_rounds > 0) {
      groups == 2 ? cfgfast::step_thread<EpsT, true, 2, true>(a, t, threads)
                  : cfgfast::step_thread<EpsT, true, 1, true>(a, t, threads);
    } else if (groups == 2) {
      vec ? cfgfast::step_thread<EpsT, true, 2>(a, t, threads) : cfgfast::step_thread<EpsT, false, 2>(a, t, threads);
    } else {
      vec ? cfgfast::step_thread<EpsT, true, 1>(a, t, threads) : cfgfast::step_thread<EpsT, false, 1>(a, t, threads);
    }
  }
}

void run_step_grid(const cfgfast::DeviceStepArgs& a, EpsType type, bool vec, int groups, uint64_t threads,
                   uint32_t prefetch_rounds) {
  switch (type) {
    case EpsType::kBFloat16: return run_step_grid<cfgfast::cpu::bf16_t>(a, vec, groups, threads, prefetch_rounds);
    case EpsType::kFloat16: return run_step_grid<cfgfast::cpu::f16_t>(a, vec, groups, threads, prefetch_rounds);
    default: return run_step_grid<float>(a, vec, groups, threads, prefetch_rounds);
  }
}

// The addresses that the step kernels asked L2 for, in order (cfgfast::prefetch_hook on the host).
std::vector<const void*> prefetched;

// Whether the prefetches of a grid of `threads` threads with `groups` groups a thread, `rounds` rounds ahead, are
// exactly the group starts [rounds * groups * threads, total_groups) of each input read (z, ε_c, ε_u, and the explicit
// noise where read), once each: every address inside the inputs, every later round's group asked for, none twice.
bool prefetches_as_expected(const std::vector<const void*>& got, const cfgfast::DeviceStepArgs& a, size_t eps_size,
                            bool read_noise, uint64_t threads, int groups, uint32_t rounds) {
  const uint64_t total = static_cast<uint64_t>(a.total_groups);
  const uint64_t ahead = rounds * static_cast<uint64_t>(groups) * threads;
  const uint64_t first = rounds == 0 ? total : std::min<uint64_t>(total, ahead);
  const struct {
    const void* base;
    size_t group_bytes;
  } inputs[] = {{a.z, 16}, {a.eps_cond, 4 * eps_size}, {a.eps_uncond, 4 * eps_size}, {read_noise ? a.noise : nullptr, 16}};
  std::vector<std::vector<int>> seen(4, std::vector<int>(static_cast<size_t>(total), 0));
  for (const void* p : got) {
    bool placed = false;
    for (size_t k = 0; k < 4 && !placed; ++k) {
      if (inputs[k].base == nullptr) continue;
      const auto* base = static_cast<const unsigned char*>(inputs[k].base);
      const auto* at = static_cast<const unsigned char*>(p);
      if (at < base || at >= base + inputs[k].group_bytes * total) continue;
      const size_t offset = static_cast<size_t>(at - base);
      if (offset % inputs[k].group_bytes != 0) return false;  // not a group's start
      ++seen[k][offset / inputs[k].group_bytes];
      placed = true;
    }
    if (!placed) return false;  // outside every input
  }
  for (size_t k = 0; k < 4; ++k) {
    for (uint64_t g = 0; g < total; ++g) {
      const int want = inputs[k].base != nullptr && g >= first ? 1 : 0;
      if (seen[k][static_cast<size_t>(g)] != want) return false;
    }
  }
  return true;
}

// Grids of 1 thread (every group in its loop), a few, one or two blocks, half the groups (with 2 groups a thread: a
// second group past the end for some threads), and as many threads as groups or more (some with none).
std::vector<uint64_t> grid_sizes(int64_t total_groups) {
  const auto g = static_cast<uint64_t>(total_groups);
  return {1, 3, 256, 257, (g + 1) / 2, g, g + 5};
}

// The CUDA kernels' code (csrc/cuda/step_kernel.h) run on the CPU, thread by thread, over grids of many sizes,
// against the scalar CPU kernel (test_kernel_step holds it to SPEC §2 in double): bit for bit, since both compile
// the same formulas here without fused multiply-adds. Covers the vectorised and scalar paths, 1 and 2 groups a thread,
// tails, misaligned pointers (all, or one at a time), each ε type, clip / last / explicit noise, and the coefficient table (rows, the last
// step, indices outside it); and the noise kernel against noise_groups.
void test_cuda_kernels_on_host() {
  cfgfast::cpu::set_active_isa(Isa::kScalar);
  const uint64_t seed = 0xfedcba9876543210ull, offset = 7;
  const uint32_t step = 11;
  const float clip = 1.0f;
  const float w[] = {0.0f, 1.5f, 7.25f, -0.5f};
  const cfgfast::StepCoef coef = to_step_coef(spec_coef(-1.0, 0.5, 0.3));
  // a table of 4 steps with different rows, for the graph-replayable variant
  constexpr int64_t kTableLen = 4;
  std::vector<double> table;
  std::vector<cfgfast::StepCoef> rows;
  for (int64_t t = 0; t < kTableLen; ++t) {
    rows.push_back(to_step_coef(spec_coef(-3.0 + 1.5 * t, -1.5 + 1.5 * t, 0.3)));
    const cfgfast::StepCoef& c = rows.back();
    for (float x : {c.alpha, c.sigma, c.mean_z, c.mean_eps, c.mean_z_clip, c.mean_x_clip, c.noise_std}) table.push_back(x);
  }
  const struct {
    int64_t batch, numel;
  } shapes[] = {{1, 1}, {3, 7}, {2, 8}, {4, 37}, {2, 64}, {3, 65}, {2, 4097}};
  Rng rng{77};
  int runs = 0, vec_runs = 0, prefetch_runs = 0;
  const float kUnwritten = 4321.0f;
  cfgfast::prefetch_hook = [](const void* p) { prefetched.push_back(p); };
  for (const auto& shape : shapes) {
    const int64_t batch = shape.batch, numel = shape.numel, total = batch * numel;
    const int64_t groups_per_sample = (numel + 3) / 4;
    std::vector<float> z(static_cast<size_t>(total)), noise(static_cast<size_t>(total));
    for (auto& v : z) v = static_cast<float>(rng.uniform(-2.0, 2.0));
    for (auto& v : noise) v = static_cast<float>(rng.uniform(-3.0, 3.0));
    for (EpsType type : {EpsType::kFloat32, EpsType::kBFloat16, EpsType::kFloat16}) {
      const EpsData ec = make_eps(type, static_cast<size_t>(total), rng);
      const EpsData eu = make_eps(type, static_cast<size_t>(total), rng);
      const size_t eps_size = type == EpsType::kFloat32 ? 4 : 2;
      // mode 0-7: clip, last and explicit noise as bits (the last step with noise is skipped);
      // mode 8-17: the table at t = 0, 2, 3 (its last row), 4 and -1 (outside: NaN), without and with clip
      for (int mode = 0; mode < 18; ++mode) {
        const bool table_mode = mode >= 8;
        const int64_t t = table_mode ? std::vector<int64_t>{0, 2, 3, 4, -1}[(mode - 8) / 2] : 0;
        const bool has_clip = table_mode ? mode % 2 == 1 : (mode & 1) != 0;
        const bool last = table_mode ? t == kTableLen - 1 : (mode & 2) != 0;
        const bool explicit_noise = !table_mode && (mode & 4) != 0;
        if (!table_mode && last && explicit_noise) continue;
        const bool valid = !table_mode || (t >= 0 && t < kTableLen);
        // which of z, eps_cond, eps_uncond, noise and out start one element past a 16-byte boundary: none (pattern
        // 0), all (1), or one (2 + its position in that list)
        for (int pattern = 0; pattern < 7; ++pattern) {
          if (pattern == 5 && !explicit_noise) continue;  // the noise shifted, and not read
          const auto shifted = [pattern](int k) { return pattern == 1 || pattern == k + 2 ? 1 : 0; };
          const Placed zp(z.data(), sizeof(float), total, shifted(0));
          const Placed ecp(ec.data(), eps_size, total, shifted(1)), eup(eu.data(), eps_size, total, shifted(2));
          const Placed np(noise.data(), sizeof(float), total, shifted(3));
          const void* ec_ptr = ecp.at;
          const void* eu_ptr = eup.at;
          // what the scalar CPU kernel writes
          cfgfast::cpu::StepArgs c{};
          c.z = static_cast<const float*>(zp.at);
          c.eps_cond = ec_ptr;
          c.eps_uncond = eu_ptr;
          c.eps_type = type;
          c.w = w;
          c.noise = explicit_noise ? static_cast<const float*>(np.at) : nullptr;
          c.numel_per_sample = numel;
          c.coef = table_mode && valid ? rows[static_cast<size_t>(t)] : coef;
          c.clip = clip;
          c.has_clip = has_clip;
          c.last = last;
          c.key = cfgfast::NoiseKey{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed),
                                    table_mode ? static_cast<uint32_t>(t) : step, 1u};
          c.index_offset = offset;
          std::vector<float> want = run_step(c, batch, Isa::kScalar, 0);
          // the CUDA kernels' arguments, as step_cuda.cu fills them
          const Aligned16 out_mem(sizeof(float) * static_cast<size_t>(total + 1 + kGuard));
          float* const out_buf = reinterpret_cast<float*>(out_mem.mem.get());
          cfgfast::DeviceStepArgs a{};
          a.z = c.z;
          a.eps_cond = ec_ptr;
          a.eps_uncond = eu_ptr;
          a.w = w;
          a.noise = c.noise;
          a.numel_per_sample = numel;
          a.groups_per_sample = groups_per_sample;
          a.total_groups = batch * groups_per_sample;
          a.coef = coef;
          a.key = cfgfast::NoiseKey{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed), table_mode ? 0u : step, 1u};
          a.keys = cfgfast::philox_keys(a.key.k0, a.key.k1);
          a.index_offset = offset;
          a.clip = has_clip ? clip : 0.0f;
          a.has_clip = has_clip;
          a.last = table_mode ? false : last;
          a.table = table_mode ? table.data() : nullptr;
          a.step_ptr = table_mode ? &t : nullptr;
          a.table_len = table_mode ? kTableLen : 0;
          for (const bool vec : {false, true}) {
            a.out = out_buf + shifted(4);
            if (vec && !cfgfast::step_vectorisable(a, 4 * eps_size)) continue;
            CHECK(!vec || (pattern == 0 && numel % 4 == 0), "vectorisable with pointer pattern %d numel %lld", pattern,
                  static_cast<long long>(numel));
            vec_runs += vec;
            // (groups a thread, L2 prefetch rounds ahead): 1 and 2 groups, and on the vectorised path each with the
            // prefetch 1, 2 and 3 rounds ahead
            std::vector<std::pair<int, uint32_t>> settings = {{1, 0}, {2, 0}};
            if (vec) settings.insert(settings.end(), {{1, 1}, {1, 2}, {1, 3}, {2, 1}, {2, 2}, {2, 3}});
            for (const auto& [groups, rounds] : settings) {
              for (uint64_t threads : grid_sizes(a.total_groups)) {
                // a finite poison: an element left unwritten differs from the CPU kernel's, and is not the NaN that
                // an index outside the table must write
                std::fill(out_buf, out_buf + total + 1 + kGuard, kGuardValue);
                for (int64_t i = 0; i < total; ++i) a.out[i] = kUnwritten;
                prefetched.clear();
                run_step_grid(a, type, vec, groups, threads, rounds);
                ++runs;
                // grids with a prefetch due: some thread has a group `rounds` rounds on
                prefetch_runs += rounds > 0 && rounds * groups * threads < static_cast<uint64_t>(a.total_groups);
                const bool read_noise = a.noise != nullptr && !last;
                CHECK(prefetches_as_expected(prefetched, a, eps_size, read_noise, threads, groups, rounds),
                      "CUDA step on the host: %s batch %lld numel %lld mode %d groups %d prefetch %u threads %llu: "
                      "%zu prefetches, not each later group's inputs once",
                      eps_name(type), static_cast<long long>(batch), static_cast<long long>(numel), mode, groups,
                      rounds, static_cast<unsigned long long>(threads), prefetched.size());
                const std::vector<float> got(a.out, a.out + total + kGuard);
                int bad = 0;
                for (int64_t i = 0; i < total; ++i) {
                  const size_t k = static_cast<size_t>(i);
                  bad += valid ? std::memcmp(&got[k], &want[k], sizeof(float)) != 0 : !std::isnan(got[k]);
                }
                CHECK(bad == 0 && guard_intact(got, total),
                      "CUDA step on the host: %s batch %lld numel %lld mode %d pointers %d vec %d groups %d prefetch %u "
                      "threads %llu: %d of %lld elements differ from the CPU kernel%s",
                      eps_name(type), static_cast<long long>(batch), static_cast<long long>(numel), mode, pattern, vec,
                      groups, rounds, static_cast<unsigned long long>(threads), bad, static_cast<long long>(total),
                      guard_intact(got, total) ? "" : ", wrote past the end");
              }
            }
          }
        }
      }
    }
    // the noise kernel
    const cfgfast::NoiseKey key{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed), step, 2u};
    const std::vector<float> want = run_noise(cfgfast::cpu::NoiseArgs{nullptr, numel, key, offset}, batch, Isa::kScalar);
    const Aligned16 out_mem(sizeof(float) * static_cast<size_t>(total + 1 + kGuard));
    for (int shift = 0; shift < 2; ++shift) {  // out at a 16-byte boundary, and one element past it
      float* const out = reinterpret_cast<float*>(out_mem.mem.get()) + shift;
      for (const bool vec : {false, true}) {
        if (vec && !cfgfast::noise_vectorisable(out, numel)) continue;
        CHECK(!vec || (shift == 0 && numel % 4 == 0), "noise vectorisable with shift %d numel %lld", shift,
              static_cast<long long>(numel));
        vec_runs += vec;
        for (uint64_t threads : grid_sizes(batch * groups_per_sample)) {
          std::fill(out, out + total, std::numeric_limits<float>::quiet_NaN());
          std::fill(out + total, out + total + kGuard, kGuardValue);
          for (uint64_t t = 0; t < threads; ++t) {
            cfgfast::noise_thread(out, numel, groups_per_sample, batch * groups_per_sample, key,
                                  cfgfast::philox_keys(key.k0, key.k1), offset, vec, t, threads);
          }
          ++runs;
          const std::vector<float> got(out, out + total + kGuard);
          CHECK(std::memcmp(got.data(), want.data(), sizeof(float) * static_cast<size_t>(total)) == 0 &&
                    guard_intact(got, total),
                "CUDA noise on the host: batch %lld numel %lld shift %d vec %d threads %llu differs from noise_groups",
                static_cast<long long>(batch), static_cast<long long>(numel), shift, vec,
                static_cast<unsigned long long>(threads));
        }
      }
    }
  }
  cfgfast::prefetch_hook = nullptr;
  std::printf("  %d grids run, %d settings on the vectorised paths, %d grids with a prefetch due\n", runs, vec_runs,
              prefetch_runs);
  CHECK(vec_runs > 0 && prefetch_runs > 0, "the vectorised paths or the prefetch never ran");
}

// test_shared_header [NAME ...]: the tests named (all without names); the sanitized build runs the kernels' tests
// only (the exhaustive ones would take minutes there).
int main(int argc, char** argv) {
  const struct {
    const char* name;
    void (*fn)();
  } tests[] = {
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
      {"cuda_kernels_on_host", test_cuda_kernels_on_host},
  };
  std::printf("cpu isa: best %s\n", cfgfast::cpu::isa_name(cfgfast::cpu::best_isa()));
  int ran = 0;
  for (const auto& t : tests) {
    bool wanted = argc < 2;
    for (int k = 1; k < argc; ++k) wanted = wanted || std::strcmp(argv[k], t.name) == 0;
    if (!wanted) continue;
    ++ran;
    const int failed_before = g_failed;
    std::printf("%s\n", t.name);
    t.fn();
    std::printf("%s: %s\n", t.name, g_failed == failed_before ? "ok" : "FAILED");
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  if (ran != (argc < 2 ? static_cast<int>(sizeof tests / sizeof tests[0]) : argc - 1)) {
    std::printf("FAIL: %d tests ran; a name given is not a test's (or was given twice)\n", ran);
    return 1;
  }
  return g_failed == 0 ? 0 : 1;
}
