// CUDA implementations of the cfgfast ops: the fused reverse step (SPEC §2) and the noise (SPEC §3),
// compiled from the same shared header as the CPU kernel (Philox, Box–Muller, the step formulas).
//
// What each thread does is in step_kernel.h (host-and-device code, run on the CPU by the C++ unit tests); this
// file launches it: grid sizes, the choice of path, streams and device guards.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would need cuSPARSE's headers at build time.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <atomic>

#include "cfgfast/normal.h"
#include "cfgfast/step.h"
#include "cuda/step_cuda.h"
#include "cuda/step_kernel.h"
#include "op_checks.h"

namespace cfgfast {
namespace {

constexpr int kThreads = 256;

// The vectorised kernels are held to the registers that 6 blocks (1 group a thread) or 4 blocks (2 groups) of 256
// threads per SM leave them (40 and 64; tests/test_codegen.py checks both, and that nothing spills). With 32-bit
// cursors and the round keys in the parameters they fit unbounded (39 and 61-63 on sm_90), so the bound is a guard
// against a change that would cost a block per SM. The scalar kernels are not bounded (0).
template <class EpsT, bool kVec, int kGroups, bool kPrefetch = false>
__global__ void __launch_bounds__(kThreads, kVec ? (kGroups == 1 ? 6 : 4) : 0) reverse_step_kernel(DeviceStepArgs a) {
  step_thread<EpsT, kVec, kGroups, kPrefetch>(a, static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                              static_cast<uint64_t>(gridDim.x) * blockDim.x);
}

__global__ void __launch_bounds__(kThreads)
    normal_noise_kernel(float* out, int64_t numel_per_sample, int64_t groups_per_sample, int64_t total_groups,
                        NoiseKey key, PhiloxKeys keys, uint64_t index_offset, bool vec) {
  noise_thread(out, numel_per_sample, groups_per_sample, total_groups, key, keys, index_offset, vec,
               static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
               static_cast<uint64_t>(gridDim.x) * blockDim.x);
}

// Groups per thread and round of the step kernel: 1 or 2, or 0 for the choice by ε's dtype: 2 for float32 ε, 1 for
// bfloat16 and float16 ε (an H200, a fixed grid of 8 blocks an SM: 2 was 5% faster for float32 and 23% slower for
// bfloat16). On
// an H100 with grids of 32 and 128 blocks an SM the two were within 1% for float32 and bfloat16 ε (gpu_table.py
// --sweep, 2026-11-26). set_cuda_groups_per_thread forces one.
std::atomic<int> groups_per_thread{0};

// Blocks per SM that the grids are capped at: 0 (the default) for kDefaultBlocksPerSm (the step kernels) or
// kNoiseBlocksPerSm (the noise kernel), or a number set by
// set_cuda_blocks_per_sm (gpu_table.py's sweep compares them). More blocks than an SM holds at once (4 to 6) run in
// waves, and each thread loops fewer rounds. On an H100 at 64M elements, against one full wave (the default before):
// 96% of the copy bandwidth for float32 ε at 128 blocks an SM, 94% at 32 and 92-93% in one wave; for bfloat16 ε 93%,
// 90% and 81% (gpu_table.py --sweep, 2026-11-26).
constexpr int kDefaultBlocksPerSm = 128;
// The noise kernel's default, apart: not swept. At 64M elements it took 0.154 ms with one full wave and 0.153 ms at
// 32 blocks an SM, 0.161 ms at 128 (three runs on one H100, 2026-11-26: across runs, so suggestive only).
constexpr int kNoiseBlocksPerSm = 32;
std::atomic<int> blocks_per_sm{0};

// The grid for total_groups groups of four: one block per kThreads * groups_per_thread groups, at most the blocks
// per SM set, or default_blocks_per_sm where none is (the kernels loop over the rest).
int grid_for(int64_t total_groups, c10::DeviceIndex device, int groups_per_thread = 1,
             int default_blocks_per_sm = kDefaultBlocksPerSm) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t per_block = static_cast<int64_t>(kThreads) * groups_per_thread;
  const int64_t needed = (total_groups + per_block - 1) / per_block;
  const int setting = blocks_per_sm.load(std::memory_order_relaxed);
  const int64_t cap = static_cast<int64_t>(sms) * (setting > 0 ? setting : default_blocks_per_sm);
  return static_cast<int>(needed < cap ? needed : cap);
}

// Rounds ahead that the vectorised step kernels prefetch their inputs into L2 (set_prefetch): 0 (the default) for
// none, or a number set by set_cuda_prefetch_rounds (gpu_table.py's sweep compares them: on an H100 every setting
// was slower, one round ahead 78-87% of the copy against 81-93% without, in the one-wave grids, 2026-11-26). Meant
// for one-wave grids (set_cuda_blocks_per_sm(6) for one group a thread, 4 for two): in the default grid a round
// ahead is hundreds of MB, more than L2 holds.
std::atomic<int> prefetch_rounds{0};

template <class EpsT, bool kVec, int kGroups, bool kPrefetch = false>
void launch_step_kernel(DeviceStepArgs a, c10::DeviceIndex device, cudaStream_t stream, int rounds = 0) {
  constexpr auto kernel = &reverse_step_kernel<EpsT, kVec, kGroups, kPrefetch>;
  const int grid = grid_for(a.total_groups, device, kGroups);
  if (kPrefetch) set_prefetch(a, static_cast<uint32_t>(rounds), kGroups, static_cast<uint64_t>(grid) * kThreads);
  kernel<<<grid, kThreads, 0, stream>>>(a);
}

void launch_step(DeviceStepArgs& a, at::ScalarType eps_type, const at::Tensor& like) {
  if (a.total_groups == 0) return;
  const size_t eps_bytes = eps_type == at::kFloat ? 16 : 8;
  const bool vec = step_vectorisable(a, eps_bytes);
  const int setting = groups_per_thread.load(std::memory_order_relaxed);
  const int per_thread = setting != 0 ? setting : (eps_type == at::kFloat ? 2 : 1);
  const c10::DeviceIndex device = like.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int rounds = prefetch_rounds.load(std::memory_order_relaxed);
  auto go = [&](auto eps_tag) {
    using E = decltype(eps_tag);
    if (!vec) {
      per_thread == 2 ? launch_step_kernel<E, false, 2>(a, device, stream)
                      : launch_step_kernel<E, false, 1>(a, device, stream);
    } else if (rounds > 0) {
      per_thread == 2 ? launch_step_kernel<E, true, 2, true>(a, device, stream, rounds)
                      : launch_step_kernel<E, true, 1, true>(a, device, stream, rounds);
    } else {
      per_thread == 2 ? launch_step_kernel<E, true, 2>(a, device, stream)
                      : launch_step_kernel<E, true, 1>(a, device, stream);
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
  check_clip(clip);
  TORCH_CHECK_VALUE(z.device().is_cuda(), "cfgfast: the cuda kernel needs CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), ec = eps_cond.contiguous(), eu = eps_uncond.contiguous(), wc = w.contiguous();
  const at::Tensor nc = noise.has_value() ? noise->contiguous() : at::Tensor();
  DeviceStepArgs a = step_args(out, zc, ec, eu, wc, nc, seed, index_offset, clip);
  a.coef = step_coef_from(coef);
  a.key.step = static_cast<uint32_t>(step);
  a.last = last;
  mark_written(out);
  launch_step(a, ec.scalar_type(), z);
}

void reverse_step_table_cuda(at::Tensor& out, const at::Tensor& z, const at::Tensor& eps_cond,
                             const at::Tensor& eps_uncond, const at::Tensor& w, const at::Tensor& coef_table,
                             const at::Tensor& step, int64_t seed, int64_t index_offset, c10::optional<double> clip) {
  check_table_args(out, z, eps_cond, eps_uncond, w, coef_table, step, index_offset);
  check_clip(clip);
  TORCH_CHECK_VALUE(z.device().is_cuda(), "cfgfast: the cuda kernel needs CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), ec = eps_cond.contiguous(), eu = eps_uncond.contiguous(), wc = w.contiguous();
  const at::Tensor table = coef_table.contiguous();
  DeviceStepArgs a = step_args(out, zc, ec, eu, wc, at::Tensor(), seed, index_offset, clip);
  a.table = table.const_data_ptr<double>();
  a.step_ptr = step.const_data_ptr<int64_t>();
  a.table_len = table.size(0);
  mark_written(out);
  launch_step(a, ec.scalar_type(), z);
}

void normal_noise_cuda(at::Tensor& out, int64_t seed, int64_t step, int64_t stream, int64_t index_offset) {
  check_noise_out(out, step, stream, index_offset);
  TORCH_CHECK_VALUE(out.device().is_cuda(), "cfgfast: the cuda kernel needs a CUDA tensor, got ", out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t batch = out.size(0);
  const int64_t n_per = batch == 0 ? 0 : out.numel() / batch;
  const int64_t groups = (n_per + 3) / 4, total = batch * groups;
  mark_written(out);
  if (total == 0) return;
  const bool vec = noise_vectorisable(out.data_ptr<float>(), n_per);
  const NoiseKey key = noise_key(seed, step, stream);
  normal_noise_kernel<<<grid_for(total, out.device().index(), 1, kNoiseBlocksPerSm), kThreads, 0,
                        c10::cuda::getCurrentCUDAStream(out.device().index()).stream()>>>(
      out.data_ptr<float>(), n_per, groups, total, key, philox_keys(key.k0, key.k1),
      static_cast<uint64_t>(index_offset), vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int set_cuda_groups_per_thread(int n) { return groups_per_thread.exchange(n == 1 || n == 2 ? n : 0); }

int set_cuda_blocks_per_sm(int n) { return blocks_per_sm.exchange(n > 0 && n <= kMaxBlocksPerSm ? n : 0); }

int set_cuda_prefetch_rounds(int n) {
  return prefetch_rounds.exchange(n > 0 && n <= kMaxPrefetchRounds ? n : 0);
}

TORCH_LIBRARY_IMPL(cfgfast, CUDA, m) {
  m.impl("reverse_step_", &reverse_step_cuda);
  m.impl("reverse_step_table_", &reverse_step_table_cuda);
  m.impl("normal_noise_", &normal_noise_cuda);
}

}  // namespace cfgfast
