// What one thread of the CUDA kernels does (the kernels themselves are in step_cuda.cu): the fused guided step
// (SPEC §6, the formula of cfgfast/step.h) and the noise (SPEC §3), written as host-and-device functions of the
// thread's place in its grid. Nothing here includes torch or the CUDA headers, so the C++ unit tests
// (tests/cpp/test_cuda_on_host.cpp) run every thread of a grid on the CPU and compare what the grid wrote with the
// CPU kernel, bit for bit: the kernels' indexing, vectorised and scalar paths, tails, grid-stride rounds and
// coefficient table are tested on a machine without a GPU. (On the GPU the radius's square root is sqrt_radius's
// inline assembly and exp is CUDA's expf; the host runs sqrtf and expf, and tests/test_step.py compares the GPU
// with the reference.)
//
// One thread per group of four elements of one sample (one Philox call), grid-stride over all groups;
// 16-byte loads and stores when every pointer is aligned and the sample length is a multiple of 4.
#pragma once

#include <cmath>
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
  const void* pred_cond;
  const void* pred_uncond;
  const float* weights;     // [B, 2] (w_cond, w_uncond) or [B, 3] (w_cond, w_uncond, w_z) per sample
  int64_t weight_columns;   // 2 or 3
  float* x_prev;            // the multistep state (read where coef.prev != 0, written with x~), or nullptr
  const void* nu;           // learned variance, pred_cond's type, or nullptr
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
  const double* table;      // [table_len, kNumStepCoef] coefficients per step, or nullptr
  const int64_t* step_ptr;  // the step counter on the device (with table)
  int64_t table_len;
};

// The model's outputs widened to float: c10::BFloat16 and c10::Half convert themselves; the unit tests' raw
// 16-bit words have overloads of their own (cpu/kernel.h), found by argument-dependent lookup.
template <class T>
CFGFAST_HOST_DEVICE float widen(T x) {
  return static_cast<float>(x);
}

// (CUDA's expf on the device; the host's is the one the CPU kernel calls, so the host run matches it bit for bit)
CFGFAST_HOST_DEVICE float expf_host_device(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

// Four consecutive values: 16 bytes of float32 or 8 bytes of bfloat16 / float16, loaded or stored at once.
template <class T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the step may take the vectorised path: every sample a whole number of groups, every pointer aligned.
inline bool step_vectorisable(const DeviceStepArgs& a, size_t pred_bytes) {
  return a.numel_per_sample % 4 == 0 && aligned(a.out, 16) && aligned(a.z, 16) && aligned(a.pred_cond, pred_bytes) &&
         aligned(a.pred_uncond, pred_bytes) && (a.x_prev == nullptr || aligned(a.x_prev, 16)) &&
         (a.nu == nullptr || aligned(a.nu, pred_bytes)) && (a.noise == nullptr || aligned(a.noise, 16));
}

// x~ and z' of one element; x_prev, scale and n are 0 where not read or drawn (step_value); w_z read where with_z.
CFGFAST_HOST_DEVICE float element(float z, float oc, float ou, float w_cond, float w_uncond, bool with_z, float w_z,
                                  float x_prev, float scale, float n, const StepCoef& c, bool has_clip, float clip,
                                  float& x) {
  const float g = with_z ? guided_output(oc, ou, z, w_cond, w_uncond, w_z) : guided_output(oc, ou, w_cond, w_uncond);
  if (has_clip) {
    x = predicted_x<true>(z, g, c, clip);
    return step_value<true>(z, g, x, ou, x_prev, scale, n, c);
  }
  x = predicted_x<false>(z, g, c, clip);
  return step_value<false>(z, g, x, ou, x_prev, scale, n, c);
}

// Thread `first` of a grid of `stride` threads handles the kGroups groups first, first + stride, ... of each round
// of its grid-stride loop, the next round kGroups * stride groups on. Every load of a round is issued before its
// noise is computed, so the reads are in flight while Philox and Box–Muller run (the noise is most of the
// arithmetic: computed first, it would keep the loads waiting behind it). kVec: the vectorised path, which needs
// step_vectorisable(a, ...). kPrevNu: x_prev and nu may be given; without it they must be nullptr (their two more
// streams would not fit the registers of the vectorised kernels' launch bounds without spills). The optional inputs
// are branches on values uniform across the grid (a pointer, a coefficient): a deterministic sampler's row
// (noise_std == 0) skips Philox altogether, and a multistep sampler's first row (prev == 0) does not read x_prev.
template <class PredT, bool kVec, int kGroups, bool kPrevNu>
CFGFAST_HOST_DEVICE void step_thread(const DeviceStepArgs& a, uint64_t first, uint64_t stride) {
  StepCoef coef = a.coef;
  NoiseKey key = a.key;
  const PhiloxKeys keys = a.keys;
  if (a.table != nullptr) {
    // The graph-replayable variant: the step index lives on the device. An index outside the table
    // (which the host cannot check without a sync) gives NaN everywhere rather than a wild read.
    int64_t t = *a.step_ptr;
    const bool valid = t >= 0 && t < a.table_len;
    t = valid ? t : 0;
    const double* row = a.table + kNumStepCoef * t;
    float c[kNumStepCoef];
    CFGFAST_UNROLL
    for (int k = 0; k < kNumStepCoef; ++k) c[k] = valid ? static_cast<float>(row[k]) : bits_float(0x7fc00000u);
    coef = StepCoef{c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]};
    key.step = static_cast<uint32_t>(t);
  }
  const bool draw = coef.noise_std != 0.0f;
  const bool philox = draw && a.noise == nullptr;
  const bool read_noise = draw && a.noise != nullptr;
  const bool read_nu = kPrevNu && draw && a.nu != nullptr;
  const bool read_prev = kPrevNu && a.x_prev != nullptr && coef.prev != 0.0f;
  const bool write_prev = kPrevNu && a.x_prev != nullptr;
  const bool with_z = a.weight_columns == 3;
  const auto* pc = static_cast<const PredT*>(a.pred_cond);
  const auto* pu = static_cast<const PredT*>(a.pred_uncond);
  const auto* pnu = static_cast<const PredT*>(a.nu);
  const uint64_t total = static_cast<uint64_t>(a.total_groups);
  const uint64_t per_sample = static_cast<uint64_t>(a.groups_per_sample);
  // Group u of a round is task + u * stride; its (sample, group) cursor jumps by a round without dividing.
  const uint32_t last_group = static_cast<uint32_t>(per_sample - 1);
  const GroupCursor jump = GroupCursor::at(kGroups * stride, per_sample);
  GroupCursor at[kGroups];
  CFGFAST_UNROLL
  for (int u = 0; u < kGroups; ++u) at[u] = GroupCursor::at(first + u * stride, per_sample);
  for (uint64_t task = first; task < total; task += kGroups * stride) {
    float zs[kGroups][4], cs[kGroups][4], us[kGroups][4], ps[kGroups][4], nus[kGroups][4], n[kGroups][4];
    float wc[kGroups], wu[kGroups], wz[kGroups];
    int64_t i0[kGroups], count[kGroups];
    CFGFAST_UNROLL
    for (int u = 0; u < kGroups; ++u) {
      if (u > 0 && task + u * stride >= total) {  // past the end (u = 0 never is: the loop's condition)
        count[u] = i0[u] = 0;
        wc[u] = wu[u] = wz[u] = 0.f;
        CFGFAST_UNROLL
        for (int k = 0; k < 4; ++k) zs[u][k] = cs[u][k] = us[u][k] = ps[u][k] = nus[u][k] = n[u][k] = 0.f;
        continue;
      }
      // with kVec every sample is a whole number of groups, so element 4 task starts the group
      i0[u] = kVec ? static_cast<int64_t>(4 * (task + u * stride))
                   : static_cast<int64_t>(at[u].b) * a.numel_per_sample + 4 * static_cast<int64_t>(at[u].g);
      const float* const w = a.weights + a.weight_columns * static_cast<int64_t>(at[u].b);
      wc[u] = w[0];
      wu[u] = w[1];
      wz[u] = with_z ? w[2] : 0.f;
      if (kVec) {
        count[u] = 4;
        const Vec4<float> z4 = *reinterpret_cast<const Vec4<float>*>(a.z + i0[u]);
        const Vec4<PredT> c4 = *reinterpret_cast<const Vec4<PredT>*>(pc + i0[u]);
        const Vec4<PredT> u4 = *reinterpret_cast<const Vec4<PredT>*>(pu + i0[u]);
        CFGFAST_UNROLL
        for (int k = 0; k < 4; ++k) zs[u][k] = z4.v[k], cs[u][k] = widen(c4.v[k]), us[u][k] = widen(u4.v[k]);
        if (read_prev) {
          const Vec4<float> p4 = *reinterpret_cast<const Vec4<float>*>(a.x_prev + i0[u]);
          CFGFAST_UNROLL
          for (int k = 0; k < 4; ++k) ps[u][k] = p4.v[k];
        } else {
          CFGFAST_UNROLL
          for (int k = 0; k < 4; ++k) ps[u][k] = 0.f;
        }
        if (read_nu) {
          const Vec4<PredT> nu4 = *reinterpret_cast<const Vec4<PredT>*>(pnu + i0[u]);
          CFGFAST_UNROLL
          for (int k = 0; k < 4; ++k) nus[u][k] = widen(nu4.v[k]);
        } else {
          CFGFAST_UNROLL
          for (int k = 0; k < 4; ++k) nus[u][k] = 0.f;
        }
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
          zs[u][k] = cs[u][k] = us[u][k] = ps[u][k] = nus[u][k] = n[u][k] = 0.f;
          if (k < count[u]) {
            const int64_t i = i0[u] + k;
            zs[u][k] = a.z[i], cs[u][k] = widen(pc[i]), us[u][k] = widen(pu[i]);
            if (read_prev) ps[u][k] = a.x_prev[i];
            if (read_nu) nus[u][k] = widen(pnu[i]);
            if (read_noise) n[u][k] = a.noise[i];
          }
        }
      }
    }
    if (philox) {
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
      float r[4], x[4];
      CFGFAST_UNROLL
      for (int k = 0; k < 4; ++k) {
        // scale = 0 where no noise is drawn (n = 0 there too), noise_std where the variance is not learned
        float scale = draw ? coef.noise_std : 0.0f;
        if (read_nu) scale = coef.noise_std * expf_host_device(coef.noise_nu * nus[u][k]);
        r[k] = element(zs[u][k], cs[u][k], us[u][k], wc[u], wu[u], with_z, wz[u], ps[u][k], scale, n[u][k], coef,
                       a.has_clip, a.clip, x[k]);
      }
      if (kVec) {
        if (count[u] > 0) {
          *reinterpret_cast<Vec4<float>*>(a.out + i0[u]) = Vec4<float>{{r[0], r[1], r[2], r[3]}};
          if (write_prev) *reinterpret_cast<Vec4<float>*>(a.x_prev + i0[u]) = Vec4<float>{{x[0], x[1], x[2], x[3]}};
        }
      } else {
        CFGFAST_UNROLL
        for (int k = 0; k < 4; ++k) {
          if (k < count[u]) {
            a.out[i0[u] + k] = r[k];
            if (write_prev) a.x_prev[i0[u] + k] = x[k];
          }
        }
      }
    }
    CFGFAST_UNROLL
    for (int u = 0; u < kGroups; ++u) at[u].advance(jump, last_group);
  }
}

// Which step kernel runs a call: step_thread<PredT, vec, groups, prev_nu>.
struct StepKernel {
  bool vec;
  int groups;
  bool prev_nu;
};

// The vectorised path where step_vectorisable; there, the kernels without x_prev and nu (groups_per_thread groups a
// thread) unless one is given, and then one group a thread. The scalar kernels take every input.
inline StepKernel step_kernel_for(const DeviceStepArgs& a, size_t pred_bytes, int groups_per_thread) {
  if (!step_vectorisable(a, pred_bytes)) return StepKernel{false, groups_per_thread, true};
  if (a.x_prev != nullptr || a.nu != nullptr) return StepKernel{true, 1, true};
  return StepKernel{true, groups_per_thread, false};
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
