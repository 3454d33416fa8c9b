// CUDA implementations of the cfgfast ops: the fused guided step (SPEC §6, cfgfast/step.h) and the noise
// (SPEC §3), compiled from the same shared header as the CPU kernel (Philox, Box–Muller, the step formulas).
//
// What each thread does is in step_kernel.h (host-and-device code, run on the CPU by the C++ unit tests); this
// file launches it: grid sizes, the choice of kernel, streams and device guards.
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

// The vectorised kernels are held to the registers that 6 blocks (1 group a thread), 4 blocks (2 groups) or 5 blocks
// (kPrevNu) of 256 threads per SM leave them (40, 64 and 48; tests/test_codegen.py checks them, and that nothing
// spills). They fit unbounded (39, 61 and 46-48 on sm_90), so the bound is a guard against a change that would cost a
// block per SM. kPrevNu's two more streams a group take one group a thread: two spilled under 64 registers, and one
// under 40. The scalar kernels are not bounded (0).
template <class PredT, bool kVec, int kGroups, bool kPrevNu>
__global__ void __launch_bounds__(kThreads, kVec ? (kPrevNu ? 5 : (kGroups == 1 ? 6 : 4)) : 0)
    guided_step_kernel(DeviceStepArgs a) {
  step_thread<PredT, kVec, kGroups, kPrevNu>(a, static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                             static_cast<uint64_t>(gridDim.x) * blockDim.x);
}

__global__ void __launch_bounds__(kThreads)
    normal_noise_kernel(float* out, int64_t numel_per_sample, int64_t groups_per_sample, int64_t total_groups,
                        NoiseKey key, PhiloxKeys keys, uint64_t index_offset, bool vec) {
  noise_thread(out, numel_per_sample, groups_per_sample, total_groups, key, keys, index_offset, vec,
               static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
               static_cast<uint64_t>(gridDim.x) * blockDim.x);
}

// Groups per thread and round of the step kernel: 1 or 2, or 0 for the choice by the model outputs' dtype: 2 for
// float32, 1 for bfloat16 and float16 (an H200, a fixed grid of 8 blocks an SM: 2 was 5% faster for float32 and 23%
// slower for bfloat16; an H100 with grids of 32 and 128 blocks an SM: the two within 1% for both, gpu_table.py
// --sweep, 2026-11-26). set_cuda_groups_per_thread forces one. With x_prev or nu: 1 (step_kernel_for).
std::atomic<int> groups_per_thread{0};

// Blocks per SM that the grids are capped at: 0 (the default) for kDefaultBlocksPerSm (the step kernels) or
// kNoiseBlocksPerSm (the noise kernel), or a number set by set_cuda_blocks_per_sm (gpu_table.py's sweep compares
// them). More blocks than an SM holds at once (4 to 6) run in waves, and each thread loops fewer rounds. On an H100
// at 64M elements: 96% of the copy bandwidth for float32 model outputs at 128 blocks an SM, 94% at 32 and 92-93% in
// one full wave; for bfloat16 93%, 90% and 81% (gpu_table.py --sweep, 2026-11-26).
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

template <class PredT, bool kVec, int kGroups, bool kPrevNu>
void launch_step_kernel(const DeviceStepArgs& a, c10::DeviceIndex device, cudaStream_t stream) {
  const int grid = grid_for(a.total_groups, device, kGroups);
  guided_step_kernel<PredT, kVec, kGroups, kPrevNu><<<grid, kThreads, 0, stream>>>(a);
}

void launch_step(const DeviceStepArgs& a, at::ScalarType pred_type, const at::Tensor& like) {
  if (a.total_groups == 0) return;
  const int setting = groups_per_thread.load(std::memory_order_relaxed);
  const int per_thread = setting != 0 ? setting : (pred_type == at::kFloat ? 2 : 1);
  const StepKernel k = step_kernel_for(a, pred_type == at::kFloat ? 16 : 8, per_thread);
  const c10::DeviceIndex device = like.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  auto go = [&](auto pred_tag) {
    using P = decltype(pred_tag);
    if (!k.vec) {
      k.groups == 2 ? launch_step_kernel<P, false, 2, true>(a, device, stream)
                    : launch_step_kernel<P, false, 1, true>(a, device, stream);
    } else if (k.prev_nu) {
      launch_step_kernel<P, true, 1, true>(a, device, stream);
    } else {
      k.groups == 2 ? launch_step_kernel<P, true, 2, false>(a, device, stream)
                    : launch_step_kernel<P, true, 1, false>(a, device, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (pred_type) {
    case at::kBFloat16: go(c10::BFloat16{}); break;
    case at::kHalf: go(c10::Half{}); break;
    default: go(float{}); break;
  }
}

// The inputs made contiguous (logical C order: SPEC §3's element index), kept alive through the launch.
struct StepInputs {
  at::Tensor z, pred_cond, pred_uncond, weights, nu, noise;
};

StepInputs contiguous_inputs(const at::Tensor& z, const at::Tensor& pred_cond, const at::Tensor& pred_uncond,
                             const at::Tensor& weights, const c10::optional<at::Tensor>& nu,
                             const c10::optional<at::Tensor>& noise) {
  return StepInputs{z.contiguous(), pred_cond.contiguous(), pred_uncond.contiguous(), weights.contiguous(),
                    nu.has_value() ? nu->contiguous() : at::Tensor(),
                    noise.has_value() ? noise->contiguous() : at::Tensor()};
}

DeviceStepArgs step_args(at::Tensor& out, const StepInputs& in, const c10::optional<at::Tensor>& x_prev,
                         int64_t seed, int64_t index_offset, c10::optional<double> clip) {
  const int64_t batch = in.z.size(0);
  DeviceStepArgs a{};
  a.out = out.data_ptr<float>();
  a.z = in.z.const_data_ptr<float>();
  a.pred_cond = in.pred_cond.const_data_ptr();
  a.pred_uncond = in.pred_uncond.const_data_ptr();
  a.weights = in.weights.const_data_ptr<float>();
  a.weight_columns = in.weights.size(1);
  // (checked contiguous: written in place)
  a.x_prev = x_prev.has_value() ? x_prev->data_ptr<float>() : nullptr;
  a.nu = in.nu.defined() ? in.nu.const_data_ptr() : nullptr;
  a.noise = in.noise.defined() ? in.noise.const_data_ptr<float>() : nullptr;
  a.numel_per_sample = batch == 0 ? 0 : in.z.numel() / batch;
  a.groups_per_sample = (a.numel_per_sample + 3) / 4;
  a.total_groups = batch * a.groups_per_sample;
  a.key = noise_key(seed, 0, /*stream=*/1);
  a.keys = philox_keys(a.key.k0, a.key.k1);
  a.index_offset = static_cast<uint64_t>(index_offset);
  a.has_clip = clip.has_value();
  a.clip = clip.has_value() ? static_cast<float>(*clip) : 0.0f;
  return a;
}

void guided_step_cuda(at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond, const at::Tensor& pred_uncond,
                      const at::Tensor& weights, const c10::optional<at::Tensor>& x_prev,
                      const c10::optional<at::Tensor>& nu, const c10::optional<at::Tensor>& noise,
                      c10::ArrayRef<double> coef, int64_t seed, int64_t step, int64_t index_offset,
                      c10::optional<double> clip) {
  check_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, step, index_offset, clip);
  TORCH_CHECK_VALUE(z.device().is_cuda(), "cfgfast: the cuda kernel needs CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const StepInputs in = contiguous_inputs(z, pred_cond, pred_uncond, weights, nu, noise);
  DeviceStepArgs a = step_args(out, in, x_prev, seed, index_offset, clip);
  a.coef = step_coef_from(coef);
  a.key.step = static_cast<uint32_t>(step);
  mark_step_outputs_written(out, x_prev);
  launch_step(a, in.pred_cond.scalar_type(), z);
}

void guided_step_table_cuda(at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond,
                            const at::Tensor& pred_uncond, const at::Tensor& weights,
                            const c10::optional<at::Tensor>& x_prev, const c10::optional<at::Tensor>& nu,
                            const at::Tensor& coef_table, const at::Tensor& step, int64_t seed, int64_t index_offset,
                            c10::optional<double> clip) {
  check_guided_table_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, index_offset, clip);
  TORCH_CHECK_VALUE(z.device().is_cuda(), "cfgfast: the cuda kernel needs CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const StepInputs in = contiguous_inputs(z, pred_cond, pred_uncond, weights, nu, c10::nullopt);
  const at::Tensor table = coef_table.contiguous();
  DeviceStepArgs a = step_args(out, in, x_prev, seed, index_offset, clip);
  a.table = table.const_data_ptr<double>();
  a.step_ptr = step.const_data_ptr<int64_t>();
  a.table_len = table.size(0);
  mark_step_outputs_written(out, x_prev);
  launch_step(a, in.pred_cond.scalar_type(), z);
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

TORCH_LIBRARY_IMPL(cfgfast, CUDA, m) {
  m.impl("guided_step_", &guided_step_cuda);
  m.impl("guided_step_table_", &guided_step_table_cuda);
  m.impl("normal_noise_", &normal_noise_cuda);
}

}  // namespace cfgfast
