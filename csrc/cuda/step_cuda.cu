// CUDA implementations of the cfgfast ops: the fused reverse step (SPEC §2) and the noise (SPEC §3),
// compiled from the same shared header as the CPU kernel (Philox, Box–Muller, the step formulas).
//
// One thread per group of four elements of one sample (one Philox call), grid-stride over all groups;
// 16-byte loads and stores when every pointer is aligned and the sample length is a multiple of 4.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would need cuSPARSE's headers at build time.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <array>
#include <atomic>

#include "cfgfast/normal.h"
#include "cfgfast/step.h"
#include "cuda/step_cuda.h"
#include "op_checks.h"

namespace cfgfast {
namespace {

constexpr int kThreads = 256;

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
};

template <class T>
__device__ __forceinline__ float widen(T x) {
  return static_cast<float>(x);
}

// Four consecutive ε values: 16 bytes of float32 or 8 bytes of bfloat16 / float16, loaded at once.
template <class T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// z' (or x~ on the last step) of one element.
__device__ __forceinline__ float element(float z, float eps, float n, const StepCoef& c, bool has_clip, float clip,
                                         bool last) {
  if (last) return has_clip ? last_value<true>(z, eps, c, clip) : last_value<false>(z, eps, c, clip);
  return has_clip ? step_value<true>(z, eps, n, c, clip) : step_value<false>(z, eps, n, c, clip);
}

// Thread j handles the kGroups groups j, j + stride, ... of each round of the grid-stride loop. Every load of
// a round is issued before its noise is computed, so the reads are in flight while Philox and Box–Muller run
// (the noise is most of the arithmetic: computed first, it kept the loads waiting behind it).
// The vectorised kernels are held to the registers that 6 blocks (1 group a thread) or 4 blocks (2 groups) of 256
// threads per SM leave them (40 and 64; tests/test_codegen.py checks both, and that nothing spills). With 32-bit
// cursors and the round keys in the parameters they fit unbounded (39 and 61-63 on sm_90), so the bound is a guard
// against a change that would cost a block per SM. The scalar kernels are not bounded (0).
template <class EpsT, bool kVec, int kGroups>
__global__ void __launch_bounds__(kThreads, kVec ? (kGroups == 1 ? 6 : 4) : 0) reverse_step_kernel(DeviceStepArgs a) {
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
      const float nan = __int_as_float(0x7fc00000);
      coef = StepCoef{nan, nan, nan, nan, nan, nan, nan};
    }
  }
  const bool draw = !last && a.noise == nullptr;
  const bool read_noise = !last && a.noise != nullptr;
  const auto* ec = static_cast<const EpsT*>(a.eps_cond);
  const auto* eu = static_cast<const EpsT*>(a.eps_uncond);
  const uint64_t total = static_cast<uint64_t>(a.total_groups);
  const uint64_t per_sample = static_cast<uint64_t>(a.groups_per_sample);
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  const uint64_t first = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Group u of a round is task + u * stride; its (sample, group) cursor jumps by a round without dividing.
  const uint32_t last_group = static_cast<uint32_t>(per_sample - 1);
  const GroupCursor jump = GroupCursor::at(kGroups * stride, per_sample);
  GroupCursor at[kGroups];
#pragma unroll
  for (int u = 0; u < kGroups; ++u) at[u] = GroupCursor::at(first + u * stride, per_sample);
  for (uint64_t task = first; task < total; task += kGroups * stride) {
    float zs[kGroups][4], cs[kGroups][4], us[kGroups][4], n[kGroups][4], w[kGroups];
    int64_t i0[kGroups], count[kGroups];
#pragma unroll
    for (int u = 0; u < kGroups; ++u) {
      if (u > 0 && task + u * stride >= total) {  // past the end (u = 0 never is: the loop's condition)
        count[u] = i0[u] = 0;
        w[u] = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) zs[u][k] = cs[u][k] = us[u][k] = n[u][k] = 0.f;
        continue;
      }
      // with kVec every sample is a whole number of groups, so element 4 task starts the group
      i0[u] = kVec ? static_cast<int64_t>(4 * (task + u * stride))
                   : static_cast<int64_t>(at[u].b) * a.numel_per_sample + 4 * static_cast<int64_t>(at[u].g);
      w[u] = a.w[at[u].b];
      if (kVec) {
        count[u] = 4;
        const float4 z4 = *reinterpret_cast<const float4*>(a.z + i0[u]);
        const Vec4<EpsT> c4 = *reinterpret_cast<const Vec4<EpsT>*>(ec + i0[u]);
        const Vec4<EpsT> u4 = *reinterpret_cast<const Vec4<EpsT>*>(eu + i0[u]);
        zs[u][0] = z4.x, zs[u][1] = z4.y, zs[u][2] = z4.z, zs[u][3] = z4.w;
#pragma unroll
        for (int k = 0; k < 4; ++k) cs[u][k] = widen(c4.v[k]), us[u][k] = widen(u4.v[k]);
        if (read_noise) {
          const float4 n4 = *reinterpret_cast<const float4*>(a.noise + i0[u]);
          n[u][0] = n4.x, n[u][1] = n4.y, n[u][2] = n4.z, n[u][3] = n4.w;
        } else {
#pragma unroll
          for (int k = 0; k < 4; ++k) n[u][k] = 0.f;
        }
      } else {
        const int64_t left = a.numel_per_sample - 4 * static_cast<int64_t>(at[u].g);
        count[u] = left < 4 ? left : 4;
#pragma unroll
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
    if (draw) {
#pragma unroll
      for (int u = 0; u < kGroups; ++u) {
        if (count[u] > 0) {
          normals4<float, uint32_t, kGroups == 1>(keys, key.step, key.stream, static_cast<uint32_t>(at[u].g),
                                    static_cast<uint32_t>(a.index_offset + at[u].b), n[u][0], n[u][1], n[u][2],
                                    n[u][3]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kGroups; ++u) {
      const float one_plus_w = 1.0f + w[u];
      float r[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float eps = guided_eps(cs[u][k], us[u][k], one_plus_w, w[u]);
        r[k] = element(zs[u][k], eps, n[u][k], coef, a.has_clip, a.clip, last);
      }
      if (kVec) {
        if (count[u] > 0) *reinterpret_cast<float4*>(a.out + i0[u]) = make_float4(r[0], r[1], r[2], r[3]);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (k < count[u]) a.out[i0[u] + k] = r[k];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kGroups; ++u) at[u].advance(jump, last_group);
  }
}

__global__ void __launch_bounds__(kThreads)
    normal_noise_kernel(float* out, int64_t numel_per_sample, int64_t groups_per_sample, int64_t total_groups,
                        NoiseKey key, PhiloxKeys keys, uint64_t index_offset, bool vec) {
  const uint64_t total = static_cast<uint64_t>(total_groups), per_sample = static_cast<uint64_t>(groups_per_sample);
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  const uint64_t first = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint32_t last_group = static_cast<uint32_t>(per_sample - 1);
  const GroupCursor jump = GroupCursor::at(stride, per_sample);
  GroupCursor at = GroupCursor::at(first, per_sample);
  for (uint64_t task = first; task < total; task += stride, at.advance(jump, last_group)) {
    float n[4];
    normals4<float, uint32_t, true>(keys, key.step, key.stream, static_cast<uint32_t>(at.g),
                              static_cast<uint32_t>(index_offset + at.b), n[0], n[1], n[2], n[3]);
    if (vec) {  // every sample a whole number of groups: element 4 task starts the group
      *reinterpret_cast<float4*>(out + 4 * task) = make_float4(n[0], n[1], n[2], n[3]);
    } else {
      float* o = out + static_cast<int64_t>(at.b) * numel_per_sample + 4 * static_cast<int64_t>(at.g);
      const int64_t left = numel_per_sample - 4 * static_cast<int64_t>(at.g);
      for (int64_t k = 0; k < left && k < 4; ++k) o[k] = n[k];
    }
  }
}

// Groups per thread and round of the step kernel: 1 or 2, or 0 for the choice by ε's dtype that the H200
// measurements of gpu_table.py made: 2 for float32 ε (5% faster than 1 at 64M elements), 1 for bfloat16 and
// float16 ε (where 2 was 23% slower). set_cuda_groups_per_thread forces one. (Measured with the fixed grid of 8
// blocks an SM, under which the 1-group kernels, 6 blocks an SM resident, ran a partial second wave and the
// 2-group ones, 4 resident, two full waves: gpu_table.py's sweep should decide again.)
std::atomic<int> groups_per_thread{0};

// Blocks of kKernel that one SM of `device` holds at once (its registers decide), asked of the runtime once per
// kernel and device. A grid-stride grid of SMs x this many blocks runs in one wave: a fixed 8 blocks an SM, as
// before, left a second wave of 2 blocks an SM (a third of the occupancy) for the kernels that fit 6.
template <auto kKernel>
int resident_blocks(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};  // 0: not asked yet
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  if (cached) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, kThreads, 0));
  blocks = blocks > 0 ? blocks : 1;
  if (cached) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

// The grid for total_groups groups of four: one block per kThreads * groups_per_thread groups, at most one full
// wave of resident blocks (the kernels loop over the rest).
template <auto kKernel>
int grid_for(int64_t total_groups, c10::DeviceIndex device, int groups_per_thread = 1) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t per_block = static_cast<int64_t>(kThreads) * groups_per_thread;
  const int64_t needed = (total_groups + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sms) * resident_blocks<kKernel>(device);
  return static_cast<int>(needed < cap ? needed : cap);
}

template <class EpsT, bool kVec, int kGroups>
void launch_step_kernel(const DeviceStepArgs& a, c10::DeviceIndex device, cudaStream_t stream) {
  constexpr auto kernel = &reverse_step_kernel<EpsT, kVec, kGroups>;
  kernel<<<grid_for<kernel>(a.total_groups, device, kGroups), kThreads, 0, stream>>>(a);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void launch_step(DeviceStepArgs& a, at::ScalarType eps_type, const at::Tensor& like) {
  if (a.total_groups == 0) return;
  const size_t eps_bytes = eps_type == at::kFloat ? 16 : 8;
  const bool vec = a.numel_per_sample % 4 == 0 && aligned(a.out, 16) && aligned(a.z, 16) &&
                   aligned(a.eps_cond, eps_bytes) && aligned(a.eps_uncond, eps_bytes) &&
                   (a.noise == nullptr || aligned(a.noise, 16));
  const int setting = groups_per_thread.load(std::memory_order_relaxed);
  const int per_thread = setting != 0 ? setting : (eps_type == at::kFloat ? 2 : 1);
  const c10::DeviceIndex device = like.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  auto go = [&](auto eps_tag) {
    using E = decltype(eps_tag);
    if (per_thread == 2) {
      vec ? launch_step_kernel<E, true, 2>(a, device, stream) : launch_step_kernel<E, false, 2>(a, device, stream);
    } else {
      vec ? launch_step_kernel<E, true, 1>(a, device, stream) : launch_step_kernel<E, false, 1>(a, device, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (eps_type) {
    case at::kBFloat16: go(c10::BFloat16{}); break;
    case at::kHalf: go(c10::Half{}); break;
    default: go(float{}); break;
  }
}

DeviceStepArgs step_args(at::Tensor& out, const at::Tensor& z, const at::Tensor& ec, const at::Tensor& eu,
                         const at::Tensor& w, const at::Tensor& noise, int64_t seed, int64_t index_offset,
                         c10::optional<double> clip) {
  const int64_t batch = z.size(0);
  DeviceStepArgs a{};
  a.out = out.data_ptr<float>();
  a.z = z.const_data_ptr<float>();
  a.eps_cond = ec.const_data_ptr();
  a.eps_uncond = eu.const_data_ptr();
  a.w = w.const_data_ptr<float>();
  a.noise = noise.defined() ? noise.const_data_ptr<float>() : nullptr;
  a.numel_per_sample = batch == 0 ? 0 : z.numel() / batch;
  a.groups_per_sample = (a.numel_per_sample + 3) / 4;
  a.total_groups = batch * a.groups_per_sample;
  a.key = noise_key(seed, 0, /*stream=*/1);
  a.keys = philox_keys(a.key.k0, a.key.k1);
  a.index_offset = static_cast<uint64_t>(index_offset);
  a.has_clip = clip.has_value();
  a.clip = clip.has_value() ? static_cast<float>(*clip) : 0.0f;
  return a;
}

void reverse_step_cuda(at::Tensor& out, const at::Tensor& z, const at::Tensor& eps_cond, const at::Tensor& eps_uncond,
                       const at::Tensor& w, const c10::optional<at::Tensor>& noise, c10::ArrayRef<double> coef,
                       int64_t seed, int64_t step, int64_t index_offset, c10::optional<double> clip, bool last) {
  check_step_args(out, z, eps_cond, eps_uncond, w, noise, coef, step, index_offset);
  TORCH_CHECK_VALUE(z.device().is_cuda(), "cfgfast: the cuda kernel needs CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), ec = eps_cond.contiguous(), eu = eps_uncond.contiguous(), wc = w.contiguous();
  const at::Tensor nc = noise.has_value() ? noise->contiguous() : at::Tensor();
  DeviceStepArgs a = step_args(out, zc, ec, eu, wc, nc, seed, index_offset, clip);
  a.coef = step_coef_from(coef);
  a.key.step = static_cast<uint32_t>(step);
  a.last = last;
  launch_step(a, ec.scalar_type(), z);
}

void reverse_step_table_cuda(at::Tensor& out, const at::Tensor& z, const at::Tensor& eps_cond,
                             const at::Tensor& eps_uncond, const at::Tensor& w, const at::Tensor& coef_table,
                             const at::Tensor& step, int64_t seed, int64_t index_offset, c10::optional<double> clip) {
  check_table_args(out, z, eps_cond, eps_uncond, w, coef_table, step, index_offset);
  TORCH_CHECK_VALUE(z.device().is_cuda(), "cfgfast: the cuda kernel needs CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), ec = eps_cond.contiguous(), eu = eps_uncond.contiguous(), wc = w.contiguous();
  const at::Tensor table = coef_table.contiguous();
  DeviceStepArgs a = step_args(out, zc, ec, eu, wc, at::Tensor(), seed, index_offset, clip);
  a.table = table.const_data_ptr<double>();
  a.step_ptr = step.const_data_ptr<int64_t>();
  a.table_len = table.size(0);
  launch_step(a, ec.scalar_type(), z);
}

void normal_noise_cuda(at::Tensor& out, int64_t seed, int64_t step, int64_t stream, int64_t index_offset) {
  check_noise_out(out, step, stream, index_offset);
  TORCH_CHECK_VALUE(out.device().is_cuda(), "cfgfast: the cuda kernel needs a CUDA tensor, got ", out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t batch = out.size(0);
  const int64_t n_per = batch == 0 ? 0 : out.numel() / batch;
  const int64_t groups = (n_per + 3) / 4, total = batch * groups;
  if (total == 0) return;
  const bool vec = n_per % 4 == 0 && aligned(out.data_ptr(), 16);
  const NoiseKey key = noise_key(seed, step, stream);
  normal_noise_kernel<<<grid_for<&normal_noise_kernel>(total, out.device().index()), kThreads, 0,
                        c10::cuda::getCurrentCUDAStream(out.device().index()).stream()>>>(
      out.data_ptr<float>(), n_per, groups, total, key, philox_keys(key.k0, key.k1),
      static_cast<uint64_t>(index_offset), vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int set_cuda_groups_per_thread(int n) { return groups_per_thread.exchange(n == 1 || n == 2 ? n : 0); }

TORCH_LIBRARY_IMPL(cfgfast, CUDA, m) {
  m.impl("reverse_step_", &reverse_step_cuda);
  m.impl("reverse_step_table_", &reverse_step_table_cuda);
  m.impl("normal_noise_", &normal_noise_cuda);
}

}  // namespace cfgfast
