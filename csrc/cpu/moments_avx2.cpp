// AVX2 body of the per-sample moments (moments_cpu.cpp): four float64 lanes, element n of a piece in lane n mod 4,
// the same additions per lane as the scalar code, so both give the same bits.
//
// As in kernel_avx2.cpp, the target pragma comes before every include and everything here has internal linkage
// but the two entry points, which moments_cpu.cpp calls only where the CPU has AVX2 and F16C.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c")
// v_j = c_j0 x_0 + c_j1 x_1 + ... and acc += v_j v_l stay two roundings each, as in the scalar code
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>

#include <cstdint>

namespace cfgfast::cpu {
namespace {

// Four elements from n on, widened exactly to float64 (dtype codes: moments_cpu.cpp's MomentsDtype).
__m256d widen4_float(const void* p, int64_t n) { return _mm256_cvtps_pd(_mm_loadu_ps(static_cast<const float*>(p) + n)); }
__m256d widen4_bf16(const void* p, int64_t n) {
  const __m128i w = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + n));
  return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(w), 16)));
}
__m256d widen4_half(const void* p, int64_t n) {
  const __m128i w = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + n));
  return _mm256_cvtps_pd(_mm_cvtph_ps(w));
}
__m256d widen4_double(const void* p, int64_t n) { return _mm256_loadu_pd(static_cast<const double*>(p) + n); }

template <__m256d (*Widen4)(const void*, int64_t)>
int64_t widen(const void* src, int64_t count, double* dst) {
  int64_t n = 0;
  for (; n + 4 <= count; n += 4) _mm256_storeu_pd(dst + n, Widen4(src, n));
  return n;
}

template <int K, int V>
int64_t accumulate(const double* const* x, const double* combos, int64_t count, double* acc) {
  constexpr int P = V + V * (V + 1) / 2;
  __m256d a[P];
  for (int p = 0; p < P; ++p) a[p] = _mm256_loadu_pd(acc + 4 * p);
  __m256d c[V][K];
  for (int j = 0; j < V; ++j) {
    for (int i = 0; i < K; ++i) c[j][i] = _mm256_set1_pd(combos[j * K + i]);
  }
  int64_t n = 0;
  for (; n + 4 <= count; n += 4) {
    __m256d xi[K];
    for (int i = 0; i < K; ++i) xi[i] = _mm256_loadu_pd(x[i] + n);
    __m256d v[V];
    for (int j = 0; j < V; ++j) {
      v[j] = _mm256_mul_pd(c[j][0], xi[0]);
      for (int i = 1; i < K; ++i) v[j] = _mm256_add_pd(v[j], _mm256_mul_pd(c[j][i], xi[i]));
      a[j] = _mm256_add_pd(a[j], v[j]);
    }
    int p = V;
    for (int j = 0; j < V; ++j) {
      for (int l = j; l < V; ++l, ++p) a[p] = _mm256_add_pd(a[p], _mm256_mul_pd(v[j], v[l]));
    }
  }
  for (int p = 0; p < P; ++p) _mm256_storeu_pd(acc + 4 * p, a[p]);
  return n;
}

using Accumulate = int64_t (*)(const double* const*, const double*, int64_t, double*);

template <int K>
Accumulate accumulate_for_v(int v) {
  switch (v) {
    case 1: return accumulate<K, 1>;
    case 2: return accumulate<K, 2>;
    case 3: return accumulate<K, 3>;
    default: return accumulate<K, 4>;
  }
}

}  // namespace

// count elements of src (dtype code `dtype`) from 0 on, as float64 into dst; returns how many (a multiple of 4).
int64_t moments_widen_avx2(const void* src, int dtype, int64_t count, double* dst) {
  switch (dtype) {
    case 1: return widen<widen4_bf16>(src, count, dst);
    case 2: return widen<widen4_half>(src, count, dst);
    case 3: return widen<widen4_double>(src, count, dst);
    default: return widen<widen4_float>(src, count, dst);
  }
}

// The moments' lanes of x[0..k)[0..count) added into acc (see moments_cpu.cpp); returns how many elements (a
// multiple of 4), the rest left to the scalar code.
int64_t moments_accumulate_avx2(const double* const* x, int k, const double* combos, int v, int64_t count,
                                double* acc) {
  switch (k) {
    case 1: return accumulate_for_v<1>(v)(x, combos, count, acc);
    case 2: return accumulate_for_v<2>(v)(x, combos, count, acc);
    case 3: return accumulate_for_v<3>(v)(x, combos, count, acc);
    default: return accumulate_for_v<4>(v)(x, combos, count, acc);
  }
}

}  // namespace cfgfast::cpu
#endif
