// AVX2 body of the fused CPU kernel: sixteen Philox groups (64 elements) per iteration.
//
// The target pragma comes before every include so that all code in this file, and only this file,
// may use AVX2/FMA/F16C. Everything defined here has internal linkage (anonymous namespace, or a
// template instantiated on its types), so no AVX2 copy of a shared inline function can leak into
// code that runs on older CPUs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c")
// a * b + c stays two roundings, as in the scalar code: the step is bit for bit the scalar kernel's (the only
// fused multiply-adds are the noise's explicit fmadd)
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>

#include "kernel.h"

namespace cfgfast::cpu {
namespace {

// N registers of 8 lanes each, processed side by side: one Philox + Box–Muller chain is long and
// serial, and N = 2 independent chains keep the core's pipelines busy (about 1.6x over N = 1).
template <int N>
struct VF {
  __m256 v[N];
  VF() = default;
  VF(__m256 x) { for (int r = 0; r < N; ++r) v[r] = x; }
  VF(float x) : VF(_mm256_set1_ps(x)) {}
};
template <int N>
struct VU {
  __m256i v[N];
  VU() = default;
  VU(__m256i x) { for (int r = 0; r < N; ++r) v[r] = x; }
  VU(uint32_t x) : VU(_mm256_set1_epi32(static_cast<int>(x))) {}
};
template <int N>
struct VM {
  __m256 v[N];
};

#define CFGFAST_LANEWISE(R, expr) \
  R out;                          \
  for (int r = 0; r < N; ++r) out.v[r] = expr; \
  return out

template <int N> inline VF<N> operator+(VF<N> a, VF<N> b) { CFGFAST_LANEWISE(VF<N>, _mm256_add_ps(a.v[r], b.v[r])); }
template <int N> inline VF<N> operator-(VF<N> a, VF<N> b) { CFGFAST_LANEWISE(VF<N>, _mm256_sub_ps(a.v[r], b.v[r])); }
template <int N> inline VF<N> operator*(VF<N> a, VF<N> b) { CFGFAST_LANEWISE(VF<N>, _mm256_mul_ps(a.v[r], b.v[r])); }
template <int N> inline VF<N> operator/(VF<N> a, VF<N> b) { CFGFAST_LANEWISE(VF<N>, _mm256_div_ps(a.v[r], b.v[r])); }
template <int N> inline VF<N> operator+(VF<N> a, float b) { return a + VF<N>(b); }
template <int N> inline VF<N> operator-(VF<N> a, float b) { return a - VF<N>(b); }
template <int N> inline VF<N> operator*(VF<N> a, float b) { return a * VF<N>(b); }
template <int N> inline VM<N> operator<(VF<N> a, float b) {
  CFGFAST_LANEWISE(VM<N>, _mm256_cmp_ps(a.v[r], _mm256_set1_ps(b), _CMP_LT_OQ));
}
template <int N> inline VF<N> fmadd(VF<N> a, VF<N> b, VF<N> c) {
  CFGFAST_LANEWISE(VF<N>, _mm256_fmadd_ps(a.v[r], b.v[r], c.v[r]));
}
template <int N> inline VF<N> select(VM<N> m, VF<N> a, VF<N> b) {
  CFGFAST_LANEWISE(VF<N>, _mm256_blendv_ps(b.v[r], a.v[r], m.v[r]));
}
template <int N> inline VF<N> sqrt_rn(VF<N> a) { CFGFAST_LANEWISE(VF<N>, _mm256_sqrt_ps(a.v[r])); }
// max/min return their second operand when either is NaN: NaN propagates like torch.clamp.
template <int N> inline VF<N> clamp_nan(VF<N> x, float lo, float hi) {
  CFGFAST_LANEWISE(VF<N>, _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), x.v[r])));
}

template <int N> inline VU<N> operator+(VU<N> a, VU<N> b) { CFGFAST_LANEWISE(VU<N>, _mm256_add_epi32(a.v[r], b.v[r])); }
template <int N> inline VU<N> operator-(VU<N> a, VU<N> b) { CFGFAST_LANEWISE(VU<N>, _mm256_sub_epi32(a.v[r], b.v[r])); }
template <int N> inline VU<N> operator^(VU<N> a, VU<N> b) { CFGFAST_LANEWISE(VU<N>, _mm256_xor_si256(a.v[r], b.v[r])); }
template <int N> inline VU<N> operator&(VU<N> a, VU<N> b) { CFGFAST_LANEWISE(VU<N>, _mm256_and_si256(a.v[r], b.v[r])); }
template <int N> inline VU<N> operator|(VU<N> a, VU<N> b) { CFGFAST_LANEWISE(VU<N>, _mm256_or_si256(a.v[r], b.v[r])); }
template <int N> inline VU<N> operator+(VU<N> a, uint32_t b) { return a + VU<N>(b); }
template <int N> inline VU<N> operator-(VU<N> a, uint32_t b) { return a - VU<N>(b); }
template <int N> inline VU<N> operator^(VU<N> a, uint32_t b) { return a ^ VU<N>(b); }
template <int N> inline VU<N> operator&(VU<N> a, uint32_t b) { return a & VU<N>(b); }
template <int N> inline VU<N> operator|(VU<N> a, uint32_t b) { return a | VU<N>(b); }
template <int N> inline VU<N> operator>>(VU<N> a, int n) { CFGFAST_LANEWISE(VU<N>, _mm256_srli_epi32(a.v[r], n)); }
template <int N> inline VU<N> operator<<(VU<N> a, int n) { CFGFAST_LANEWISE(VU<N>, _mm256_slli_epi32(a.v[r], n)); }
template <int N> inline VM<N> nonzero(VU<N> a) {
  CFGFAST_LANEWISE(VM<N>, _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(a.v[r], _mm256_setzero_si256()),
                                                                _mm256_set1_epi32(-1))));
}
template <int N> inline VF<N> to_float(VU<N> a) { CFGFAST_LANEWISE(VF<N>, _mm256_cvtepi32_ps(a.v[r])); }  // as int32
template <int N> inline VU<N> float_bits(VF<N> a) { CFGFAST_LANEWISE(VU<N>, _mm256_castps_si256(a.v[r])); }
template <int N> inline VF<N> bits_float(VU<N> a) { CFGFAST_LANEWISE(VF<N>, _mm256_castsi256_ps(a.v[r])); }

// 32x32 -> 64-bit products of the even and the odd lanes, split into high and low words.
template <int N>
inline void mulhilo(uint32_t m, VU<N> x, VU<N>& hi, VU<N>& lo) {
  const __m256i mm = _mm256_set1_epi32(static_cast<int>(m));
  for (int r = 0; r < N; ++r) {
    const __m256i even = _mm256_mul_epu32(x.v[r], mm);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x.v[r], 32), mm);
    hi.v[r] = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo.v[r] = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
}
#undef CFGFAST_LANEWISE

using F8 = VF<1>;
constexpr int kRegs = 2;           // independent Philox chains per iteration
constexpr int64_t kLanes = 8 * kRegs;  // groups per iteration

inline F8 load(const float* p) { return F8(_mm256_loadu_ps(p)); }
inline F8 load(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return F8(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
}
inline F8 load(const f16_t* p) { return F8(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
inline void store(float* p, F8 x) { _mm256_storeu_ps(p, x.v[0]); }

// The per-call constants of the noise: the ten round keys, broadcast once (not once per iteration).
struct NoiseConstants {
  VU<kRegs> k0[10], k1[10];
  VU<kRegs> sample, step, stream;
  explicit NoiseConstants(const NoiseKey& key, uint32_t sample_index)
      : sample(sample_index), step(key.step), stream(key.stream) {
    const PhiloxKeys keys = philox_keys(key.k0, key.k1);
    for (int round = 0; round < 10; ++round) {
      k0[round] = VU<kRegs>(keys.k0[round]);
      k1[round] = VU<kRegs>(keys.k1[round]);
    }
  }
};

// Normals of groups g .. g + kLanes - 1 in C order: out[m] holds elements 8m .. 8m + 7 of the run.
inline void group_normals(const NoiseConstants& c, int64_t g, F8 out[4 * kRegs]) {
  VU<kRegs> x0;
  for (int r = 0; r < kRegs; ++r) {
    x0.v[r] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                               _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g) + 8u * r)));
  }
  VU<kRegs> x1 = c.sample, x2 = c.step, x3 = c.stream;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) philox_round(x0, x1, x2, x3, c.k0[round], c.k1[round]);
  VF<kRegs> n0, n1, n2, n3;
  box_muller4<VF<kRegs>, VU<kRegs>>(x0, x1, x2, x3, n0, n1, n2, n3);
  for (int r = 0; r < kRegs; ++r) {
    // one normal per lane (lane = group) -> four consecutive normals per group
    const __m256 t0 = _mm256_unpacklo_ps(n0.v[r], n1.v[r]), t1 = _mm256_unpackhi_ps(n0.v[r], n1.v[r]);
    const __m256 t2 = _mm256_unpacklo_ps(n2.v[r], n3.v[r]), t3 = _mm256_unpackhi_ps(n2.v[r], n3.v[r]);
    const __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    const __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    out[4 * r + 0] = _mm256_permute2f128_ps(u0, u1, 0x20);
    out[4 * r + 1] = _mm256_permute2f128_ps(u2, u3, 0x20);
    out[4 * r + 2] = _mm256_permute2f128_ps(u0, u1, 0x31);
    out[4 * r + 3] = _mm256_permute2f128_ps(u2, u3, 0x31);
  }
}

// (calls with learned variance never come here: step_groups gives them to the scalar code)
template <class EpsT, bool kClip, NoiseMode kNoise>
struct Avx2Step {
  static int64_t run(const StepArgs& a, int64_t b, int64_t g0, int64_t g1) {
    const int64_t base = b * a.numel_per_sample;
    const auto* pc = static_cast<const EpsT*>(a.pred_cond);
    const auto* pu = static_cast<const EpsT*>(a.pred_uncond);
    const StepCoef& c = a.coef;
    const float* const w = a.weights + a.weight_columns * b;
    const bool with_z = a.weight_columns == 3;
    const F8 w_cond(w[0]), w_uncond(w[1]), w_z(with_z ? w[2] : 0.0f);
    // the state is not read where prev == 0: it may be uninitialised at a multistep sampler's first step
    const float* const prev_in = c.prev != 0.0f ? a.x_prev : nullptr;
    const F8 zero(0.0f), scale(kNoise == NoiseMode::kNone ? 0.0f : c.noise_std);
    const NoiseConstants noise(a.key, static_cast<uint32_t>(a.index_offset + static_cast<uint64_t>(b)));
    int64_t g = g0;
    for (; g + kLanes <= g1; g += kLanes) {
      F8 n[4 * kRegs];
      if (kNoise == NoiseMode::kDrawn) group_normals(noise, g, n);
      const int64_t i0 = base + 4 * g;
      for (int k = 0; k < 4 * kRegs; ++k) {
        const int64_t i = i0 + 8 * k;
        const F8 z = load(a.z + i), ou = load(pu + i);
        const F8 gd = with_z ? guided_output(load(pc + i), ou, z, w_cond, w_uncond, w_z)
                             : guided_output(load(pc + i), ou, w_cond, w_uncond);
        const F8 x = predicted_x<kClip>(z, gd, c, a.clip);
        const F8 xp = prev_in != nullptr ? load(prev_in + i) : zero;
        const F8 nk = kNoise == NoiseMode::kExplicit ? load(a.noise + i) : kNoise == NoiseMode::kDrawn ? n[k] : zero;
        store(a.out + i, step_value<kClip>(z, gd, x, ou, xp, scale, nk, c));
        if (a.x_prev != nullptr) store(a.x_prev + i, x);
      }
    }
    return g;
  }
};

}  // namespace

int64_t step_groups_avx2(const StepArgs& args, int64_t b, int64_t g0, int64_t g1) {
  return dispatch_step<Avx2Step, int64_t>(args, b, g0, g1);
}

int64_t noise_groups_avx2(const NoiseArgs& a, int64_t b, int64_t g0, int64_t g1) {
  float* out = a.out + b * a.numel_per_sample;
  const NoiseConstants noise(a.key, static_cast<uint32_t>(a.index_offset + static_cast<uint64_t>(b)));
  int64_t g = g0;
  for (; g + kLanes <= g1; g += kLanes) {
    F8 n[4 * kRegs];
    group_normals(noise, g, n);
    for (int k = 0; k < 4 * kRegs; ++k) store(out + 4 * g + 8 * k, n[k]);
  }
  return g;
}

}  // namespace cfgfast::cpu
#endif
