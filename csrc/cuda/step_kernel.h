// What one thread of the CUDA kernels does (the kernels themselves are in step_cuda.cu): the fused reverse step
// (SPEC §2) and the noise (SPEC §3), written as host-and-device functions of the thread's place in its grid.
// Nothing here includes torch or the CUDA headers, so the C++ unit tests (test_cuda_kernels_on_host in
// tests/cpp/test_shared_header.cpp) run every thread of a grid on the CPU and compare what the grid wrote with the CPU kernel, bit for bit: the
// kernels' indexing, vectorised and scalar paths, tails, grid-stride rounds and coefficient table are tested on
// a machine without a GPU. (On the GPU the radius's square root is sqrt_radius's inline assembly; the host runs
// its sqrtf, and tests/test_step.py compares the GPU with the reference.)
//
// One thread per group of four elements of one sample (one Philox call), grid-stride over all groups;
// 16-byte loads and stores when every pointer is aligned and the sample length is a multiple of 4.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cfgfast/normal.h"
#include "cfgfast/step.h"

#if defined(__CUDACC__)
#define CFGFAST_UNROLL _Pragma("unroll")
#else
#define CFGFAST_UNROLL
#endif

namespace cfgfast {

struct DeviceStepArgs {
  float* out;
  const float* z;
  const void* eps_cond;
  const void* eps_uncond;
  const float* w;
  const float* noise;       // explicit noise or nullptr
  int64_t numel_per_sample;
  int64_t groups_per_sample;
  int64_t total_groups;
  StepCoef coef;
  NoiseKey key;
  PhiloxKeys keys;          // key.k0, key.k1's round keys: the XORs read them from the kernel parameters
  uint64_t index_offset;
  float clip;
  bool has_clip;
  bool last;
  const double* table;      // [table_len, 7] coefficients per step, or nullptr
  const int64_t* step_ptr;  // the step counter on the device (with table)
  int64_t table_len;
  // L2 prefetch (the kernels with kPrefetch): of the group prefetch_elements / 4 on from each of the thread's groups,
  // for those below prefetch_below. Set by set_prefetch, per grid.
  int64_t prefetch_elements;
  uint64_t prefetch_below;
};

// The prefetch of the step's inputs `rounds` rounds ahead (0: none) in a grid-stride loop of `stride` threads with
// kGroups groups a thread: each thread asks L2 for the inputs of the groups it will load that many rounds on, so
// that more reads are in flight than the registers hold; the loads of that round then find their lines in L2. The
// kernels with kPrefetch only, so the others are untouched.
inline void set_prefetch(DeviceStepArgs& a, uint32_t rounds, int groups_per_thread, uint64_t stride) {
  const uint64_t ahead = static_cast<uint64_t>(rounds) * static_cast<uint64_t>(groups_per_thread) * stride;
  const uint64_t total = static_cast<uint64_t>(a.total_groups);
  a.prefetch_elements = static_cast<int64_t>(4 * ahead);
  a.prefetch_below = rounds > 0 && total > ahead ? total - ahead : 0;
}

#if !defined(__CUDA_ARCH__)
// Host builds (the C++ unit tests): called with every address the step prefetches, where set.
inline void (*prefetch_hook)(const void*) = nullptr;
#endif

// A hint that the 16 bytes at p will be read soon: on the GPU, a prefetch of their line into L2 (no register, no
// result; the load that follows is served from L2); on the host, prefetch_hook, so the tests can check the addresses.
CFGFAST_HOST_DEVICE void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(p)));
#else
  if (prefetch_hook != nullptr) prefetch_hook(p);
#endif
}

// ε widened to float: c10::BFloat16 and c10::Half convert themselves; the unit tests' raw 16-bit words have
// overloads of their own (cpu/kernel.h), found by argument-dependent lookup.
template <class T>
CFGFAST_HOST_DEVICE float widen(T x) {
  return static_cast<float>(x);
}

// Four consecutive values: 16 bytes of float32 or 8 bytes of bfloat16 / float16, loaded or stored at once.
template <class T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the step may take the vectorised path: every sample a whole number of groups, every pointer aligned.
inline bool step_vectorisable(const DeviceStepArgs& a, size_t eps_bytes) {
  return a.numel_per_sample % 4 == 0 && aligned(a.out, 16) && aligned(a.z, 16) && aligned(a.eps_cond, eps_bytes) &&
         aligned(a.eps_uncond, eps_bytes) && (a.noise == nullptr || aligned(a.noise, 16));
}

// z' (or x~ on the last step) of one element.
CFGFAST_HOST_DEVICE float element(float z, float eps, float n, const StepCoef& c, bool has_clip, float clip,
                                  bool last) {
  if (last) return has_clip ? last_value<true>(z, eps, c, clip) : last_value<false>(z, eps, c, clip);
  return has_clip ? step_value<true>(z, eps, n, c, clip) : step_value<false>(z, eps, n, c, clip);
}

// Thread `first` of a grid of `stride` threads handles the kGroups groups first, first + stride, ... of each round
// of its grid-stride loop, the next round kGroups * stride groups on. Every load of a round is issued before its
// noise is computed, so the reads are in flight while Philox and Box–Muller run (the noise is most of the
// arithmetic: computed first, it kept the loads waiting behind it). kVec: the vectorised path, which needs
// step_vectorisable(a, ...). kPrefetch (vectorised path only): also the L2 prefetch that set_prefetch sets up.
template <class EpsT, bool kVec, int kGroups, bool kPrefetch = false>
CFGFAST_HOST_DEVICE void step_thread(const DeviceStepArgs& a, uint64_t first, uint64_t stride) {
  static_assert(!kPrefetch || kVec, "the prefetch is for the vectorised kernels");
  StepCoef coef = a.coef;
  NoiseKey key = a.key;
  const PhiloxKeys keys = a.keys;
  bool last = a.last;
  if (a.table != nullptr) {
    // The graph-replayable variant: the step index lives on the device. An index outside the table
    // (which the host cannot check without a sync) gives NaN everywhere rather than a wild read.
    int64_t t = *a.step_ptr;
    const bool valid = t >= 0 && t < a.table_len;
    t = valid ? t : 0;
    const double* row = a.table + 7 * t;
    coef = StepCoef{static_cast<float>(row[0]), static_cast<float>(row[1]), static_cast<float>(row[2]),
                    static_cast<float>(row[3]), static_cast<float>(row[4]), static_cast<float>(row[5]),
                    static_cast<float>(row[6])};
    key.step = static_cast<uint32_t>(t);
    last = t == a.table_len - 1;
    if (!valid) {  // every coefficient NaN: x~ and z' are NaN in every mode
      const float nan = bits_float(0x7fc00000u);
      coef = StepCoef{nan, nan, nan, nan, nan, nan, nan};
    }
  }
  const bool draw = !last && a.noise == nullptr;
  const bool read_noise = !last && a.noise != nullptr;
  const auto* ec = static_cast<const EpsT*>(a.eps_cond);
  const auto* eu = static_cast<const EpsT*>(a.eps_uncond);
  const uint64_t total = static_cast<uint64_t>(a.total_groups);
  const uint64_t per_sample = static_cast<uint64_t>(a.groups_per_sample);
  // Group u of a round is task + u * stride; its (sample, group) cursor jumps by a round without dividing.
  const uint32_t last_group = static_cast<uint32_t>(per_sample - 1);
  const GroupCursor jump = GroupCursor::at(kGroups * stride, per_sample);
  GroupCursor at[kGroups];
  CFGFAST_UNROLL
  for (int u = 0; u < kGroups; ++u) at[u] = GroupCursor::at(first + u * stride, per_sample);
  for (uint64_t task = first; task < total; task += kGroups * stride) {
    float zs[kGroups][4], cs[kGroups][4], us[kGroups][4], n[kGroups][4], w[kGroups];
    int64_t i0[kGroups], count[kGroups];
    CFGFAST_UNROLL
    for (int u = 0; u < kGroups; ++u) {
      if (u > 0 && task + u * stride >= total) {  // past the end (u = 0 never is: the loop's condition)
        count[u] = i0[u] = 0;
        w[u] = 0.f;
        CFGFAST_UNROLL
        for (int k = 0; k < 4; ++k) zs[u][k] = cs[u][k] = us[u][k] = n[u][k] = 0.f;
        continue;
      }
      // with kVec every sample is a whole number of groups, so element 4 task starts the group
      i0[u] = kVec ? static_cast<int64_t>(4 * (task + u * stride))
                   : static_cast<int64_t>(at[u].b) * a.numel_per_sample + 4 * static_cast<int64_t>(at[u].g);
      w[u] = a.w[at[u].b];
      if (kVec) {
        count[u] = 4;
        const Vec4<float> z4 = *reinterpret_cast<const Vec4<float>*>(a.z + i0[u]);
        const Vec4<EpsT> c4 = *reinterpret_cast<const Vec4<EpsT>*>(ec + i0[u]);
        const Vec4<EpsT> u4 = *reinterpret_cast<const Vec4<EpsT>*>(eu + i0[u]);
        CFGFAST_UNROLL
        for (int k = 0; k < 4; ++k) zs[u][k] = z4.v[k], cs[u][k] = widen(c4.v[k]), us[u][k] = widen(u4.v[k]);
        if (read_noise) {
          const Vec4<float> n4 = *reinterpret_cast<const Vec4<float>*>(a.noise + i0[u]);
          CFGFAST_UNROLL
          for (int k = 0; k < 4; ++k) n[u][k] = n4.v[k];
        } else {
          CFGFAST_UNROLL
          for (int k = 0; k < 4; ++k) n[u][k] = 0.f;
        }
      } else {
        const int64_t left = a.numel_per_sample - 4 * static_cast<int64_t>(at[u].g);
        count[u] = left < 4 ? left : 4;
        CFGFAST_UNROLL
        for (int k = 0; k < 4; ++k) {
          zs[u][k] = cs[u][k] = us[u][k] = n[u][k] = 0.f;
          if (k < count[u]) {
            const int64_t i = i0[u] + k;
            zs[u][k] = a.z[i], cs[u][k] = widen(ec[i]), us[u][k] = widen(eu[i]);
            if (read_noise) n[u][k] = a.noise[i];
          }
        }
      }
    }
    if constexpr (kPrefetch) {  // after the loads of this round, before its noise (set_prefetch)
      CFGFAST_UNROLL
      for (int u = 0; u < kGroups; ++u) {
        if (task + u * stride < a.prefetch_below) {
          const int64_t j = i0[u] + a.prefetch_elements;
          prefetch_l2(a.z + j);
          prefetch_l2(ec + j);
          prefetch_l2(eu + j);
          if (read_noise) prefetch_l2(a.noise + j);
        }
      }
    }
    if (draw) {
      CFGFAST_UNROLL
      for (int u = 0; u < kGroups; ++u) {
        if (count[u] > 0) {
          normals4<float, uint32_t, kGroups == 1>(keys, key.step, key.stream, static_cast<uint32_t>(at[u].g),
                                                  static_cast<uint32_t>(a.index_offset + at[u].b), n[u][0], n[u][1],
                                                  n[u][2], n[u][3]);
        }
      }
    }
    CFGFAST_UNROLL
    for (int u = 0; u < kGroups; ++u) {
      const float one_plus_w = 1.0f + w[u];
      float r[4];
      CFGFAST_UNROLL
      for (int k = 0; k < 4; ++k) {
        const float eps = guided_eps(cs[u][k], us[u][k], one_plus_w, w[u]);
        r[k] = element(zs[u][k], eps, n[u][k], coef, a.has_clip, a.clip, last);
      }
      if (kVec) {
        if (count[u] > 0) *reinterpret_cast<Vec4<float>*>(a.out + i0[u]) = Vec4<float>{{r[0], r[1], r[2], r[3]}};
      } else {
        CFGFAST_UNROLL
        for (int k = 0; k < 4; ++k) {
          if (k < count[u]) a.out[i0[u] + k] = r[k];
        }
      }
    }
    CFGFAST_UNROLL
    for (int u = 0; u < kGroups; ++u) at[u].advance(jump, last_group);
  }
}

// Whether the noise may take the vectorised path: every sample a whole number of groups, out aligned.
inline bool noise_vectorisable(const float* out, int64_t numel_per_sample) {
  return numel_per_sample % 4 == 0 && aligned(out, 16);
}

// Thread `first` of a grid of `stride` threads: the normals of groups first, first + stride, ... into out.
// vec: the vectorised path, which needs noise_vectorisable(out, numel_per_sample).
CFGFAST_HOST_DEVICE void noise_thread(float* out, int64_t numel_per_sample, int64_t groups_per_sample,
                                      int64_t total_groups, const NoiseKey& key, const PhiloxKeys& keys,
                                      uint64_t index_offset, bool vec, uint64_t first, uint64_t stride) {
  const uint64_t total = static_cast<uint64_t>(total_groups), per_sample = static_cast<uint64_t>(groups_per_sample);
  const uint32_t last_group = static_cast<uint32_t>(per_sample - 1);
  const GroupCursor jump = GroupCursor::at(stride, per_sample);
  GroupCursor at = GroupCursor::at(first, per_sample);
  for (uint64_t task = first; task < total; task += stride, at.advance(jump, last_group)) {
    float n[4];
    normals4<float, uint32_t, true>(keys, key.step, key.stream, static_cast<uint32_t>(at.g),
                                    static_cast<uint32_t>(index_offset + at.b), n[0], n[1], n[2], n[3]);
    if (vec) {  // every sample a whole number of groups: element 4 task starts the group
      *reinterpret_cast<Vec4<float>*>(out + 4 * task) = Vec4<float>{{n[0], n[1], n[2], n[3]}};
    } else {
      float* o = out + static_cast<int64_t>(at.b) * numel_per_sample + 4 * static_cast<int64_t>(at.g);
      const int64_t left = numel_per_sample - 4 * static_cast<int64_t>(at.g);
      for (int64_t k = 0; k < left && k < 4; ++k) o[k] = n[k];
    }
  }
}

}  // namespace cfgfast
