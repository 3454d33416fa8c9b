// AVX2 body of the per-sample moments (moments_cpu.cpp): four float64 lanes, element n of a chunk in lane n mod 4,
// the same additions per lane as the scalar code, so both give the same bits.
//
// The inputs are read in their own type and widened to float64 in registers, inside the loop that adds them up (one
// pass over memory, no buffer); K, V and the element type are template arguments, so the loop body is straight
// code with its accumulators in registers.
//
// As in kernel_avx2.cpp, the target pragma comes before every include and everything here has internal linkage
// but the entry point, which moments_cpu.cpp calls only where the CPU has AVX2 and F16C.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c")
// v_j = c_j0 x_0 + c_j1 x_1 + ... and acc += v_j v_l stay two roundings each, as in the scalar code (an explicit
// fused multiply-add only where the product is exact: the same bits)
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cfgfast::cpu {
namespace {

// Four elements from p on, widened exactly to float64.
struct Float {
  using T = float;
  static __m256d load4(const T* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
};
struct BFloat16 {
  using T = uint16_t;
  static __m256d load4(const T* p) {  // a bfloat16 is the high half of its float32
    const __m128i w = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), w)));
  }
};
struct Float16 {
  using T = uint16_t;
  static __m256d load4(const T* p) {
    return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};
struct Float64 {
  using T = double;
  static __m256d load4(const T* p) { return _mm256_loadu_pd(p); }
};

// kIdentity: every v_j = x_j taken as it is, for combos that are the identity (the inputs' own moments, as
// cfgfast.guidance takes them). 1 x_j is x_j, and 0 x_i is a zero for a finite x_i, which can only change the sign of
// a zero v_j, and a zero's sign is lost in the sums (they start at +0, never become -0, and s + (+-0) = s). A
// non-finite x_i makes 0 x_i a NaN: the caller checks for that (moments_accumulate_avx2). With inputs of 32 bits or
// fewer, v_j v_l is then exact in float64, so a fused multiply-add gives the bits of the product rounded and then
// added (the scalar code's) in one instruction.
template <int K, int V, class Load, bool kIdentity>
int64_t accumulate(const void* const* src, const double* combos, int64_t count, double* acc) {
  constexpr bool kExactProducts = kIdentity && !std::is_same_v<Load, Float64>;
  constexpr int P = V + V * (V + 1) / 2;
  using T = typename Load::T;
  const T* x[K];
  for (int i = 0; i < K; ++i) x[i] = static_cast<const T*>(src[i]);
  __m256d a[P];
  for (int p = 0; p < P; ++p) a[p] = _mm256_loadu_pd(acc + 4 * p);
  __m256d c[V][K];
  for (int j = 0; j < V; ++j) {
    for (int i = 0; i < K; ++i) c[j][i] = _mm256_set1_pd(combos[j * K + i]);
  }
  int64_t n = 0;
  for (; n + 4 <= count; n += 4) {
    __m256d xi[K];
    for (int i = 0; i < K; ++i) xi[i] = Load::load4(x[i] + n);
    __m256d v[V];
    for (int j = 0; j < V; ++j) {
      if (kIdentity) {
        v[j] = xi[j];
        a[j] = _mm256_add_pd(a[j], v[j]);
        continue;
      }
      v[j] = _mm256_mul_pd(c[j][0], xi[0]);
      for (int i = 1; i < K; ++i) v[j] = _mm256_add_pd(v[j], _mm256_mul_pd(c[j][i], xi[i]));
      a[j] = _mm256_add_pd(a[j], v[j]);
    }
    int p = V;
    for (int j = 0; j < V; ++j) {
      for (int l = j; l < V; ++l, ++p) {
        a[p] = kExactProducts ? _mm256_fmadd_pd(v[j], v[l], a[p]) : _mm256_add_pd(a[p], _mm256_mul_pd(v[j], v[l]));
      }
    }
  }
  for (int p = 0; p < P; ++p) _mm256_storeu_pd(acc + 4 * p, a[p]);
  return n;
}

using Accumulate = int64_t (*)(const void* const*, const double*, int64_t, double*);

template <int K, class Load, bool kIdentity>
Accumulate accumulate_for_v(int v) {
  if constexpr (kIdentity) {
    return accumulate<K, K, Load, true>;  // (v == k)
  } else {
    switch (v) {
      case 1: return accumulate<K, 1, Load, false>;
      case 2: return accumulate<K, 2, Load, false>;
      case 3: return accumulate<K, 3, Load, false>;
      default: return accumulate<K, 4, Load, false>;
    }
  }
}

template <class Load, bool kIdentity>
Accumulate accumulate_for(int k, int v) {
  switch (k) {
    case 1: return accumulate_for_v<1, Load, kIdentity>(v);
    case 2: return accumulate_for_v<2, Load, kIdentity>(v);
    case 3: return accumulate_for_v<3, Load, kIdentity>(v);
    default: return accumulate_for_v<4, Load, kIdentity>(v);
  }
}

template <bool kIdentity>
Accumulate accumulate_for(int dtype, int k, int v) {
  switch (dtype) {
    case 1: return accumulate_for<BFloat16, kIdentity>(k, v);
    case 2: return accumulate_for<Float16, kIdentity>(k, v);
    case 3: return accumulate_for<Float64, kIdentity>(k, v);
    default: return accumulate_for<Float, kIdentity>(k, v);
  }
}

// Whether every v_j = x_j (kIdentity): V = K and the combos the identity. Each input then has a row of its own, so a
// non-finite x_j makes its own sum non-finite, which the caller sees.
bool identity(int k, const double* combos, int v) {
  bool unit = v == k;
  for (int j = 0; j < v && unit; ++j) {
    for (int i = 0; i < k; ++i) unit = unit && combos[j * k + i] == (i == j ? 1.0 : 0.0);
  }
  return unit;
}

bool all_finite(const double* acc, int count) {
  bool finite = true;
  for (int m = 0; m < count; ++m) finite = finite && acc[m] - acc[m] == 0.0;  // inf - inf and NaN: NaN
  return finite;
}

}  // namespace

// The moments' lanes of elements [0, count) of src[0..k), all of one type (dtype codes: moments_cpu.cpp's
// MomentsDtype), added into acc (see moments_cpu.cpp); returns how many elements (a multiple of 4), the rest left
// to the scalar code.
int64_t moments_accumulate_avx2(const void* const* src, int dtype, int k, const double* combos, int v, int64_t count,
                                double* acc) {
  const int moments = 4 * (v + v * (v + 1) / 2);
  if (identity(k, combos, v)) {
    double before[4 * (4 + 10)];
    std::memcpy(before, acc, sizeof(double) * moments);
    const int64_t done = accumulate_for<true>(dtype, k, v)(src, combos, count, acc);
    // all finite: no input was (a sum that meets a non-finite term stays so), and the identity's short form gave the
    // general loop's bits
    if (all_finite(acc, moments)) return done;
    std::memcpy(acc, before, sizeof(double) * moments);
  }
  return accumulate_for<false>(dtype, k, v)(src, combos, count, acc);
}

}  // namespace cfgfast::cpu
#endif
