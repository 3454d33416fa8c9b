// cfgfast::per_sample_guided_step_ on the CPU: the step with SPEC §7's guidance rescale or APG, each sample's
// reduction and step run back to back while that sample's tensors are in the core's cache.
//
// cfgfast/guidance.py composes the same step from passes over the whole batch (APG's running value updated by the
// fused step, the moments of cfgfast::sample_moments, the per-sample weights, the fused step reading them): each pass
// streams the batch from memory, 11 tensor passes with APG's momentum against the plain step's 4. Here one task takes
// one sample (48 KiB a tensor at 3 x 64 x 64 float32) through all of it: the running value's update (the fused step's
// own affine form, as guidance.py), the inputs' moments (cfgfast::sample_moments' chunks and additions: the same
// bits), the weights (guidance.py's float64 arithmetic, in its order), and the fused step of kernel.cpp reading them.
// Where the batch makes fewer such tasks than there are threads, the same stages run batch-wide, each split over
// chunks of every sample: the same values, in another order of tasks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernel.h"
#include "moments.h"
#include "op_checks.h"
#include "step_args.h"

// (after the includes) the weights' arithmetic rounds each operation as guidance.py's numpy does, also where the
// baseline target has fused multiply-adds (aarch64)
#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace cfgfast {
namespace {

// Below about this many elements a task costs a second thread more than it saves (as ops_cpu.cpp).
constexpr int64_t kMinElementsPerThread = 65536;

// numpy's maximum and minimum: a NaN x stays NaN
inline double at_least(double x, double lo) { return x < lo ? lo : x; }
inline double at_most(double x, double hi) { return x > hi ? hi : x; }

// The method's settings, guide = [phi] or [phi, eta_parallel, norm_threshold, momentum] (APG).
struct Method {
  double phi = 0.0, eta = 0.0, rho = 0.0, beta = 0.0;
  bool apg = false;
};

// guidance.py's _rescale_factor: k = phi std(a) / std(y) + 1 - phi for y = a_coef a + b_coef b, from <b, b>, <a, b>,
// <a, a>, sum b, sum a over n elements.
double rescale_factor(double phi, double a_coef, double b_coef, double bb, double ab, double aa, double sb, double sa,
                      double n) {
  const double mean_y = (a_coef * sa + b_coef * sb) / n;
  const double var_y = (a_coef * a_coef * aa + 2.0 * a_coef * b_coef * ab + b_coef * b_coef * bb) / n - mean_y * mean_y;
  const double mean_a = sa / n;
  const double var_a = aa / n - mean_a * mean_a;
  return phi * std::sqrt(at_least(var_a, 0.0)) / std::sqrt(at_least(var_y, 0.0)) + (1.0 - phi);
}

struct Plan {
  Method method;
  cpu::StepArgs step{};    // the step, its weights those of `weights` below
  cpu::StepArgs update{};  // APG's running value: z = out = M, z' = M + d g
  std::vector<float> weights, update_weights;
  // the moments' inputs (identity combinations) and their sample layout
  int k = 0;
  const void* src[4] = {};
  cpu::MomentsDtype dtype[4] = {};
  int64_t element_size[4] = {};
  std::vector<double> identity;
  double pred_z = 0.0, pred_g = 0.0;
  const float* cfg = nullptr;  // the caller's weights [B, 2]
  int64_t n_per = 0, chunks = 0;

  int moments() const { return k + k * (k + 1) / 2; }

  // Stage 1 for chunk c of sample b: the running value's update there, then the chunk's moments into partial.
  void chunk(int64_t b, int64_t c, double* partial) const {
    const int64_t n0 = c * cpu::kMomentsChunk, n1 = std::min(n0 + cpu::kMomentsChunk, n_per);
    if (method.beta != 0.0) cpu::step_groups(update, b, n0 / 4, (n1 + 3) / 4);
    const void* at_n0[4] = {};
    for (int i = 0; i < k; ++i) at_n0[i] = static_cast<const char*>(src[i]) + (b * n_per + n0) * element_size[i];
    cpu::chunk_moments(at_n0, dtype, element_size, k, identity.data(), k, n1 - n0, partial);
  }

  // Stage 2: sample b's weights from its chunks' partials (added in chunk order), guidance.py's arithmetic.
  void weigh(int64_t b, const double* partials) {
    double total[cpu::kMaxMomentsPerChunk] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      for (int m = 0; m < moments(); ++m) total[m] += partials[c * moments() + m];
    }
    double gram[4][4], sums[4];  // the inputs' Gram matrix and sums
    int p = k;
    for (int j = 0; j < k; ++j) {
      sums[j] = total[j];
      for (int l = j; l < k; ++l, ++p) gram[j][l] = gram[l][j] = total[p];
    }
    const double n = static_cast<double>(n_per);
    const double w_cond = cfg[2 * b], w_uncond = cfg[2 * b + 1];
    float* out = weights.data() + b * step.weight_columns;
    if (!method.apg) {  // rescale: y = g = w_cond o_c - w_uncond o_u, a = o_c
      const double f = rescale_factor(method.phi, w_cond, -w_uncond, gram[1][1], gram[1][0], gram[0][0], sums[1],
                                      sums[0], n);
      out[0] = static_cast<float>(w_cond * f);
      out[1] = static_cast<float>(w_uncond * f);
      return;
    }
    // x~_c = c_0 . inputs and Delta = c_1 . inputs (guidance.py's _apg): <Delta, Delta>, <Delta, x~_c>,
    // <x~_c, x~_c> as sum_ab c_ja c_lb M_ab in the order of its flattened (a, b), and the sums
    double c[2][4] = {};
    const int zi = k == 3 ? 1 : 0;  // (x0-prediction: no z among the inputs)
    if (k == 3) c[0][0] = pred_z;
    c[0][zi] = pred_g;
    if (method.beta != 0.0) {
      c[1][zi + 1] = 1.0;  // Delta = M
    } else {
      c[1][zi] = pred_g;
      c[1][zi + 1] = -pred_g;
    }
    auto inner = [&](int j, int l) {
      double s = 0.0;
      for (int a = 0; a < k; ++a) {
        for (int e = 0; e < k; ++e) s += c[j][a] * c[l][e] * gram[a][e];
      }
      return s;
    };
    auto sum_of = [&](int j) {
      double s = 0.0;
      for (int a = 0; a < k; ++a) s += sums[a] * c[j][a];
      return s;
    };
    const double dd = inner(1, 1), dx = inner(1, 0), xx = inner(0, 0), sd = sum_of(1), sx = sum_of(0);
    const double w = w_uncond;
    double scale = 1.0;
    if (method.rho > 0) scale = at_most(method.rho / std::sqrt(at_least(dd, 0.0)), 1.0);
    const double along = dx / at_least(xx, 1e-24);
    double a = 1.0 - w * scale * (1.0 - method.eta) * along;
    double bw = w * scale;
    if (method.phi != 0.0) {
      const double f = rescale_factor(method.phi, a, bw, dd, dx, xx, sd, sx, n);
      a = a * f;
      bw = bw * f;
    }
    const double inv_g = pred_g != 0.0 ? 1.0 / pred_g : 0.0;
    const double w_z = (a - 1.0) * (pred_z * inv_g);
    out[0] = static_cast<float>(method.beta != 0.0 ? a : a + bw);
    out[1] = static_cast<float>(method.beta != 0.0 ? -bw * inv_g : bw);
    out[2] = static_cast<float>(w_z);
  }
};

void per_sample_guided_step_cpu(at::Tensor& out, const at::Tensor& z, const at::Tensor& pred_cond,
                                const at::Tensor& pred_uncond, const at::Tensor& weights,
                                const c10::optional<at::Tensor>& running, const c10::optional<at::Tensor>& x_prev,
                                const c10::optional<at::Tensor>& nu, const c10::optional<at::Tensor>& noise,
                                c10::ArrayRef<double> coef, c10::ArrayRef<double> guide, int64_t seed, int64_t step,
                                int64_t index_offset, c10::optional<double> clip) {
  check_per_sample_guidance_args(out, z, pred_cond, pred_uncond, weights, running, x_prev, nu, noise, coef, guide,
                                 step, index_offset, clip);
  TORCH_CHECK_VALUE(z.device().is_cpu(), "cfgfast: the cpu kernel needs CPU tensors, got ", z.device());
  cpu::HeldInputs held;
  Plan plan;
  plan.step = cpu::step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, seed, step,
                             index_offset, clip, held);
  const at::Tensor &zc = held.z, &pc = held.pred_cond, &pu = held.pred_uncond;
  const int64_t batch = z.size(0);
  plan.method = guide.size() == 4 ? Method{guide[0], guide[1], guide[2], guide[3], true} : Method{guide[0]};
  const bool momentum = plan.method.beta != 0.0;
  plan.n_per = plan.step.numel_per_sample;
  plan.chunks = (plan.n_per + cpu::kMomentsChunk - 1) / cpu::kMomentsChunk;
  plan.pred_z = coef[0];
  plan.pred_g = coef[1];
  plan.cfg = held.weights.const_data_ptr<float>();
  float* m = momentum ? running->data_ptr<float>() : nullptr;

  // the step reads the weights made per sample below, and M in o_u's place with momentum
  cpu::StepArgs& s = plan.step;
  if (momentum) s.pred_uncond = m;
  s.weight_columns = plan.method.apg ? 3 : 2;
  plan.weights.resize(static_cast<size_t>(batch * s.weight_columns));
  s.weights = plan.weights.data();

  if (momentum) {  // guidance.py's _update_running_value: per sample (on, on, guided (momentum - 1) / d), row (1, d)
    const double d = plan.pred_g != 0.0 ? plan.pred_g : 1.0;
    const double on_g = plan.pred_g != 0.0 ? 1.0 : 0.0;
    plan.update_weights.resize(static_cast<size_t>(batch * 3));
    for (int64_t b = 0; b < batch; ++b) {
      const double guided = plan.cfg[2 * b + 1] != 0.0f ? 1.0 : 0.0;
      plan.update_weights[3 * b] = plan.update_weights[3 * b + 1] = static_cast<float>(guided * on_g);
      plan.update_weights[3 * b + 2] = static_cast<float>(guided * ((plan.method.beta - 1.0) / d));
    }
    const double row[kNumStepCoef] = {0.0, 0.0, 0.0, 0.0, 1.0, d, 0.0, 0.0, 0.0, 0.0};
    cpu::StepArgs& u = plan.update;
    u.out = m;
    u.z = m;
    u.pred_cond = pc.const_data_ptr();
    u.pred_uncond = pu.const_data_ptr();
    u.eps_type = s.eps_type;
    u.weights = plan.update_weights.data();
    u.weight_columns = 3;
    u.numel_per_sample = plan.n_per;
    u.coef = step_coef_from(c10::ArrayRef<double>(row, kNumStepCoef));
  }
  // the moments' inputs: (o_c, o_u) for rescale; APG's (z, o_c, o_u or M), z left out where x~_c does not read it
  const at::Tensor* inputs[3] = {&pc, &pu, nullptr};
  if (plan.method.apg && plan.pred_z != 0.0) {
    inputs[0] = &zc;
    inputs[1] = &pc;
    inputs[2] = &pu;
  }
  plan.k = inputs[2] == nullptr ? 2 : 3;
  for (int i = 0; i < plan.k; ++i) {
    const bool is_m = momentum && i == plan.k - 1;
    plan.src[i] = is_m ? static_cast<const void*>(m) : inputs[i]->const_data_ptr();
    plan.dtype[i] = is_m ? cpu::MomentsDtype::kFloat32 : cpu::moments_dtype_of(*inputs[i]);
    plan.element_size[i] = is_m ? 4 : inputs[i]->element_size();
  }
  plan.identity.assign(static_cast<size_t>(plan.k * plan.k), 0.0);
  for (int i = 0; i < plan.k; ++i) plan.identity[i * plan.k + i] = 1.0;

  mark_step_outputs_written(out, x_prev);
  if (momentum) mark_written(*running);
  if (batch == 0 || plan.n_per == 0) return;
  const int64_t groups = (plan.n_per + 3) / 4, moments = plan.moments();
  // items a task, for items of `elements` elements
  const auto grain = [](int64_t elements) { return std::max<int64_t>(1, kMinElementsPerThread / elements); };
  if ((batch + grain(plan.n_per) - 1) / grain(plan.n_per) >= at::get_num_threads()) {
    // one task a sample, in cache from its first stage to its last
    at::parallel_for(0, batch, grain(plan.n_per), [&](int64_t begin, int64_t end) {
      std::vector<double> partials(static_cast<size_t>(plan.chunks * moments));
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c = 0; c < plan.chunks; ++c) plan.chunk(b, c, partials.data() + c * moments);
        plan.weigh(b, partials.data());
        cpu::step_groups(plan.step, b, 0, groups);
      }
    });
    return;
  }
  std::vector<double> partials(static_cast<size_t>(batch * plan.chunks * moments));
  at::parallel_for(0, batch * plan.chunks, grain(std::min(plan.n_per, cpu::kMomentsChunk)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) plan.chunk(t / plan.chunks, t % plan.chunks, partials.data() + t * moments);
  });
  for (int64_t b = 0; b < batch; ++b) plan.weigh(b, partials.data() + b * plan.chunks * moments);
  const int64_t block = 2048;  // groups a task (ops_cpu.cpp's blocks)
  const int64_t blocks = (groups + block - 1) / block;
  at::parallel_for(0, batch * blocks, grain(std::min(plan.n_per, 4 * block)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, g0 = (t % blocks) * block;
      cpu::step_groups(plan.step, b, g0, std::min(g0 + block, groups));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cfgfast, CPU, m) { m.impl("per_sample_guided_step_", &per_sample_guided_step_cpu); }

}  // namespace cfgfast
