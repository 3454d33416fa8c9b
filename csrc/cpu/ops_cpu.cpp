// CPU implementations of the cfgfast ops: check, make inputs contiguous, split the work over
// threads (ATen's parallel_for) in blocks of groups, run the fused kernel of kernel.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "kernel.h"
#include "op_checks.h"
#include "step_args.h"

namespace cfgfast {
namespace {

// 2048 groups = 8192 elements per task: a few tens of microseconds of work, 32 KiB per stream.
constexpr int64_t kBlockGroups = 2048;
// Below about this many elements a second thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 65536;

template <class Fn>
void for_each_block(int64_t batch, int64_t numel_per_sample, Fn fn) {
  const int64_t groups = (numel_per_sample + 3) / 4;
  const int64_t blocks = (groups + kBlockGroups - 1) / kBlockGroups;
  if (batch == 0 || blocks == 0) return;
  const int64_t elements_per_task = numel_per_sample < 4 * kBlockGroups ? numel_per_sample : 4 * kBlockGroups;
  const int64_t grain = (kMinElementsPerThread + elements_per_task - 1) / elements_per_task;
  at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, g0 = (task % blocks) * kBlockGroups;
      fn(b, g0, g0 + kBlockGroups < groups ? g0 + kBlockGroups : groups);
    }
  });
}

void guided_step_cpu(at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond, const at::Tensor& pred_uncond,
                     const at::Tensor& weights, const c10::optional<at::Tensor>& x_prev,
                     const c10::optional<at::Tensor>& nu, const c10::optional<at::Tensor>& noise,
                     c10::ArrayRef<double> coef, int64_t seed, int64_t step, int64_t index_offset,
                     c10::optional<double> clip) {
  check_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, step, index_offset, clip);
  TORCH_CHECK_VALUE(z.device().is_cpu(), "cfgfast: the cpu kernel needs CPU tensors, got ", z.device());
  cpu::HeldInputs held;
  const cpu::StepArgs args =
      cpu::step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, seed, step, index_offset, clip,
                     held);
  const int64_t batch = z.size(0);
  mark_step_outputs_written(out, x_prev);
  for_each_block(batch, args.numel_per_sample,
                 [&](int64_t b, int64_t g0, int64_t g1) { cpu::step_groups(args, b, g0, g1); });
}

// The table variant on the CPU (for tests and for CPU code written against it): t is read on the host.
void guided_step_table_cpu(at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond,
                           const at::Tensor& pred_uncond, const at::Tensor& weights,
                           const c10::optional<at::Tensor>& x_prev, const c10::optional<at::Tensor>& nu,
                           const at::Tensor& coef_table, const at::Tensor& step, int64_t seed, int64_t index_offset,
                           c10::optional<double> clip) {
  check_guided_table_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, index_offset, clip);
  const int64_t t = step.item<int64_t>(), steps = coef_table.size(0);
  TORCH_CHECK_VALUE(t >= 0 && t < steps, "cfgfast: step ", t, " is outside the table of ", steps, " steps");
  const at::Tensor row = coef_table[t].contiguous();
  const double* r = row.const_data_ptr<double>();
  guided_step_cpu(out, z, pred_cond, pred_uncond, weights, x_prev, nu, c10::nullopt,
                  c10::ArrayRef<double>(r, kNumStepCoef), seed, t, index_offset, clip);
}

void normal_noise_cpu(at::Tensor& out, int64_t seed, int64_t step, int64_t stream, int64_t index_offset) {
  check_noise_out(out, step, stream, index_offset);
  TORCH_CHECK_VALUE(out.device().is_cpu(), "cfgfast: the cpu kernel needs a CPU tensor, got ", out.device());
  const int64_t batch = out.size(0);
  cpu::NoiseArgs args{out.data_ptr<float>(), batch == 0 ? 0 : out.numel() / batch, noise_key(seed, step, stream),
                      static_cast<uint64_t>(index_offset)};
  mark_written(out);
  for_each_block(batch, args.numel_per_sample,
                 [&](int64_t b, int64_t g0, int64_t g1) { cpu::noise_groups(args, b, g0, g1); });
}

}  // namespace

TORCH_LIBRARY_IMPL(cfgfast, CPU, m) {
  m.impl("guided_step_", &guided_step_cpu);
  m.impl("guided_step_table_", &guided_step_table_cpu);
  m.impl("normal_noise_", &normal_noise_cpu);
}

}  // namespace cfgfast
