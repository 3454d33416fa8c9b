// Philox4x32-10 (Salmon et al. 2011, Random123), the counter-based generator of SPEC §3.
#pragma once

#include "cfgfast/common.h"

namespace cfgfast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bumps (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

CFGFAST_HOST_DEVICE void mulhilo(uint32_t m, uint32_t x, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(m) * x;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// One Philox round on the counter (x0, x1, x2, x3) in place; U is uint32_t or a vector of lanes with
// mulhilo and ^ defined; K is uint32_t or (for SIMD code that precomputes the key schedule) a U.
template <class U, class K>
CFGFAST_HOST_DEVICE void philox_round(U& x0, U& x1, U& x2, U& x3, K k0, K k1) {
  U hi0, lo0, hi1, lo1;
  mulhilo(kPhiloxM0, x0, hi0, lo0);
  mulhilo(kPhiloxM1, x2, hi1, lo1);
  const U y0 = hi1 ^ x1 ^ k0;
  const U y2 = hi0 ^ x3 ^ k1;
  x0 = y0;
  x1 = lo1;
  x2 = y2;
  x3 = lo0;
}

// The ten round keys of a key: (k0, k1) bumped by the Weyl constants between rounds. Computed once per launch,
// they are kernel parameters that each round's XOR reads directly; bumped inside a grid-stride loop, they cost
// two additions a round for every group (20 of the ~280 instructions the CUDA step spends on a group).
struct PhiloxKeys {
  uint32_t k0[10], k1[10];
};

CFGFAST_HOST_DEVICE PhiloxKeys philox_keys(uint32_t k0, uint32_t k1) {
  PhiloxKeys keys{};
  for (int round = 0; round < 10; ++round, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    keys.k0[round] = k0;
    keys.k1[round] = k1;
  }
  return keys;
}

// Ten rounds under the round keys.
template <class U>
CFGFAST_HOST_DEVICE void philox4x32_10(U& x0, U& x1, U& x2, U& x3, const PhiloxKeys& keys) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) philox_round(x0, x1, x2, x3, keys.k0[round], keys.k1[round]);
}

template <class U>
CFGFAST_HOST_DEVICE void philox4x32_10(U& x0, U& x1, U& x2, U& x3, uint32_t k0, uint32_t k1) {
  philox4x32_10(x0, x1, x2, x3, philox_keys(k0, k1));
}

// SPEC §3 key from a 64-bit seed.
CFGFAST_HOST_DEVICE uint32_t seed_key0(uint64_t seed) { return static_cast<uint32_t>(seed); }
CFGFAST_HOST_DEVICE uint32_t seed_key1(uint64_t seed) { return static_cast<uint32_t>(seed >> 32); }

}  // namespace cfgfast
