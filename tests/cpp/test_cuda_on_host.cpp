// The CUDA kernels' code (csrc/cuda/step_kernel.h) run on the CPU, thread by thread, over grids of many sizes,
// against the scalar CPU kernel (csrc/cpu/kernel.h; test_shared_header.cpp holds it to the formulas in double): bit
// for bit, since both compile the same formulas here without fused multiply-adds. No GPU, torch or CUDA toolkit is
// needed: the kernels' indexing, paths and optional inputs are tested wherever the C++ tests run.
//
//   test_cuda_on_host [NAME ...]     (the tests named; all without names)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "cfgfast/normal.h"
#include "cfgfast/philox.h"
#include "cfgfast/step.h"
#include "check.h"
#include "cpu/kernel.h"
#include "cuda/step_kernel.h"

namespace {

using cfgfast::StepCoef;
using cfgfast::cpu::EpsType;
using cfgfast::cpu::Isa;

// splitmix64: a fixed, portable stream of test inputs.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint32_t u32() { return static_cast<uint32_t>(next() >> 32); }
  double uniform(double lo, double hi) { return lo + (hi - lo) * static_cast<double>(next() >> 11) * 0x1p-53; }
};

const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Values of one of the model's output types as raw storage: moderate (|x| < 4), subnormals included for the 16-bit
// types; or all NaN (an input that must not be read).
struct PredData {
  std::vector<float> f32;
  std::vector<uint16_t> bits;
  EpsType type;
  const void* data() const { return type == EpsType::kFloat32 ? static_cast<const void*>(f32.data()) : bits.data(); }
};

PredData make_pred(EpsType type, size_t count, Rng& rng, bool nan = false) {
  PredData e{{}, {}, type};
  for (size_t i = 0; i < count; ++i) {
    const uint32_t r = rng.u32();
    const uint32_t sign = (r & 1u) << 15;
    if (type == EpsType::kFloat32) {
      e.f32.push_back(nan ? kNaN : static_cast<float>(rng.uniform(-3.0, 3.0)));
    } else if (type == EpsType::kFloat16) {
      const uint32_t exp = (r >> 1) % 17u;  // 0 (subnormal) .. 16: |x| < 4
      e.bits.push_back(nan ? uint16_t{0x7e00} : static_cast<uint16_t>(sign | (exp << 10) | ((r >> 8) & 0x3ffu)));
    } else {
      const uint32_t exp = 112u + (r >> 1) % 17u;  // 2^-15 .. |x| < 4
      e.bits.push_back(nan ? uint16_t{0x7fc0} : static_cast<uint16_t>(sign | (exp << 7) | ((r >> 8) & 0x7fu)));
    }
  }
  return e;
}

size_t pred_size(EpsType t) { return t == EpsType::kFloat32 ? 4 : 2; }

const char* type_name(EpsType t) {
  return t == EpsType::kBFloat16 ? "bf16" : (t == EpsType::kFloat16 ? "f16" : "f32");
}

constexpr int64_t kGuard = 19;  // elements past the end of out and x_prev that the kernel must not touch
constexpr float kGuardValue = -12345.0f;
// a finite poison: an element left unwritten differs from the CPU kernel's, and is not the NaN that an index
// outside the coefficient table must write
constexpr float kUnwritten = 4321.0f;

// Exactly `bytes` bytes starting at a 16-byte boundary (AddressSanitizer knows where they end), whatever alignment
// the allocator gives a std::vector.
struct Aligned16 {
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{16}); }
  };
  std::unique_ptr<unsigned char[], Free> mem;
  explicit Aligned16(size_t bytes)
      : mem(static_cast<unsigned char*>(::operator new[](bytes, std::align_val_t{16}))) {}
};

// `count` values of `size` bytes copied `shift` values after a 16-byte boundary, in a buffer that ends right after
// them: a read past the end is a read outside the buffer (the sanitized build stops at it).
struct Placed {
  Aligned16 buf;
  const void* at;
  Placed(const void* src, size_t size, int64_t count, int shift)
      : buf(size * static_cast<size_t>(count + shift)), at(buf.mem.get() + size * static_cast<size_t>(shift)) {
    std::memcpy(buf.mem.get() + size * static_cast<size_t>(shift), src, size * static_cast<size_t>(count));
  }
};

// A float32 buffer the kernel writes (out, x_prev): `count` elements `shift` elements after a 16-byte boundary,
// then kGuard guard elements.
struct Written {
  Aligned16 buf;
  float* at;
  int64_t count;
  Written(int64_t count_, int shift)
      : buf(sizeof(float) * static_cast<size_t>(count_ + shift + kGuard)),
        at(reinterpret_cast<float*>(buf.mem.get()) + shift),
        count(count_) {
    fill(std::vector<float>(static_cast<size_t>(count), kUnwritten));
  }
  void fill(const std::vector<float>& values) {
    std::copy(values.begin(), values.end(), at);
    std::fill(at + count, at + count + kGuard, kGuardValue);
  }
  bool guard_intact() const {
    return std::all_of(at + count, at + count + kGuard, [](float v) { return v == kGuardValue; });
  }
};

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// Elements of got that differ from want bit for bit (want empty: those that are not NaN).
int64_t differences(const float* got, const std::vector<float>& want, int64_t count) {
  int64_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    bad += want.empty() ? !std::isnan(got[i]) : !same_bits(got[i], want[static_cast<size_t>(i)]);
  }
  return bad;
}

// What the scalar CPU kernel writes into out and x_prev (x_prev_in: the state it starts from; empty: none given).
struct Result {
  std::vector<float> out, x_prev;
};

Result run_cpu(cfgfast::cpu::StepArgs c, int64_t batch, const std::vector<float>& x_prev_in) {
  cfgfast::cpu::set_active_isa(Isa::kScalar);
  Result w;
  w.out.assign(static_cast<size_t>(batch * c.numel_per_sample), kUnwritten);
  w.x_prev = x_prev_in;
  c.out = w.out.data();
  c.x_prev = x_prev_in.empty() ? nullptr : w.x_prev.data();
  const int64_t groups = (c.numel_per_sample + 3) / 4;
  for (int64_t b = 0; b < batch; ++b) cfgfast::cpu::step_groups(c, b, 0, groups);
  return w;
}

// Every thread of a grid of `threads` threads of the CUDA step kernel, one after another: the threads write
// disjoint groups, so their order does not matter.
template <class PredT>
void run_step_grid(const cfgfast::DeviceStepArgs& a, const cfgfast::StepKernel& k, uint64_t threads) {
  for (uint64_t t = 0; t < threads; ++t) {
    if (k.vec) {
      if (k.prev_nu) {
        k.groups == 2 ? cfgfast::step_thread<PredT, true, 2, true>(a, t, threads)
                      : cfgfast::step_thread<PredT, true, 1, true>(a, t, threads);
      } else {
        k.groups == 2 ? cfgfast::step_thread<PredT, true, 2, false>(a, t, threads)
                      : cfgfast::step_thread<PredT, true, 1, false>(a, t, threads);
      }
    } else {
      k.groups == 2 ? cfgfast::step_thread<PredT, false, 2, true>(a, t, threads)
                    : cfgfast::step_thread<PredT, false, 1, true>(a, t, threads);
    }
  }
}

void run_step_grid(const cfgfast::DeviceStepArgs& a, EpsType type, const cfgfast::StepKernel& k, uint64_t threads) {
  switch (type) {
    case EpsType::kBFloat16: return run_step_grid<cfgfast::cpu::bf16_t>(a, k, threads);
    case EpsType::kFloat16: return run_step_grid<cfgfast::cpu::f16_t>(a, k, threads);
    default: return run_step_grid<float>(a, k, threads);
  }
}

// Grids of 1 thread (every group in its loop), a few, one or two blocks, half the groups (with 2 groups a thread: a
// second group past the end for some threads), and as many threads as groups or more (some with none).
std::vector<uint64_t> grid_sizes(int64_t total_groups) {
  const auto g = static_cast<uint64_t>(total_groups);
  return {1, 3, 256, 257, (g + 1) / 2, g, g + 5};
}

// Coefficient rows of the shapes the samplers make (values arbitrary: both kernels evaluate the same formula), in
// StepCoef's order: pred_z, pred_g, mean_z, mean_x, direct_z, direct_g, prev, uncond, noise_std, noise_nu.
const StepCoef kRows[] = {
    // every term, the noise scaled by learned variance where nu is given
    {1.7f, -0.9f, 0.6f, 0.35f, 0.8f, -0.4f, 0.3f, 0.05f, 0.45f, 0.7f},
    // deterministic multistep (dpmpp_2m): no noise, prev != 0
    {0.0f, 1.0f, 0.55f, 0.45f, 0.55f, 0.45f, -0.25f, 0.0f, 0.0f, 0.0f},
    // a stochastic step without the multistep term (ddpm, dpmpp_2m_sde's first step), CFG++'s uncond
    {1.25f, -0.6f, 0.9f, 0.12f, 1.1f, -0.07f, 0.0f, -0.3f, 0.2f, -0.35f},
    // the last step: x~ itself
    {1.3f, -0.8f, 0.0f, 1.0f, 1.3f, -0.8f, 0.0f, 0.0f, 0.0f, 0.0f},
};
constexpr int64_t kNumRows = sizeof kRows / sizeof kRows[0];

// The inputs of one call, as both kernels read them.
struct Case {
  EpsType type;
  int64_t batch, numel;
  const StepCoef* coef;  // the row of the call (nullptr: an index outside the table)
  bool clip, x_prev, nu, noise;
  int64_t t;             // with table: the step counter; else -2
  bool with_z;           // weights [B, 3]: a third column w_z (g + w_z z)
};

// which of z, pred_cond, pred_uncond, noise, x_prev, nu and out start one element past a 16-byte boundary: none
// (pattern 0), all (1), or one (2 + its position in that list)
constexpr int kPointers = 7;
int shifted(int pattern, int k) { return pattern == 1 || pattern == k + 2 ? 1 : 0; }

struct Inputs {
  std::vector<float> z, noise, x_prev;
  PredData pc, pu, nu;
};

// Runs every kernel that can take the call (the vectorised path where step_vectorisable, the scalar path always;
// 1 and 2 groups a thread; with and without x_prev and nu where neither is given) over every grid size, and
// compares what each wrote into out and x_prev with the CPU kernel. Returns the grids run (vectorised ones in *vec).
// The CPU kernel draws with (seed, step); the CUDA kernels with (kernel_seed, kernel_step), the same but where a call
// without noise is to be shown independent of them.
int run_case(const Case& cs, const Inputs& in, int pattern, const std::vector<double>& table, uint64_t seed,
             uint32_t step, uint64_t kernel_seed, uint32_t kernel_step, uint64_t offset, float clip, int* vec_runs,
             int* prev_nu_runs) {
  const int64_t total = cs.batch * cs.numel, groups_per_sample = (cs.numel + 3) / 4;
  const size_t psize = pred_size(cs.type);
  const Placed zp(in.z.data(), sizeof(float), total, shifted(pattern, 0));
  const Placed pcp(in.pc.data(), psize, total, shifted(pattern, 1));
  const Placed pup(in.pu.data(), psize, total, shifted(pattern, 2));
  const Placed np(in.noise.data(), sizeof(float), total, shifted(pattern, 3));
  const Placed nup(in.nu.data(), psize, total, shifted(pattern, 5));
  Written xp(total, shifted(pattern, 4)), out(total, shifted(pattern, 6));
  std::vector<float> weights;
  for (int64_t b = 0; b < cs.batch; ++b) {
    weights.push_back(1.0f + 0.75f * static_cast<float>(b));  // (1 + w, w) with w = 0, 0.75, ...
    weights.push_back(0.75f * static_cast<float>(b));
    if (cs.with_z) weights.push_back(0.5f - 0.375f * static_cast<float>(b));
  }
  weights[0] = -0.5f;  // and one pair that no sampler makes
  const int64_t columns = cs.with_z ? 3 : 2;
  const bool table_mode = cs.t != -2;
  const bool valid = cs.coef != nullptr;
  const std::vector<float> x_prev_in = cs.x_prev ? in.x_prev : std::vector<float>();
  // the CPU kernel's result: for the table, row t with key.step = t
  Result want;
  if (valid) {
    cfgfast::cpu::StepArgs c{};
    c.z = static_cast<const float*>(zp.at);
    c.pred_cond = pcp.at;
    c.pred_uncond = pup.at;
    c.eps_type = cs.type;
    c.weights = weights.data();
    c.weight_columns = columns;
    c.nu = cs.nu ? nup.at : nullptr;
    c.noise = cs.noise ? static_cast<const float*>(np.at) : nullptr;
    c.numel_per_sample = cs.numel;
    c.coef = *cs.coef;
    c.clip = clip;
    c.has_clip = cs.clip;
    c.key = cfgfast::NoiseKey{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed),
                              table_mode ? static_cast<uint32_t>(cs.t) : step, 1u};
    c.index_offset = offset;
    want = run_cpu(c, cs.batch, x_prev_in);
  }
  // the CUDA kernels' arguments, as step_cuda.cu fills them
  cfgfast::DeviceStepArgs a{};
  a.out = out.at;
  a.z = static_cast<const float*>(zp.at);
  a.pred_cond = pcp.at;
  a.pred_uncond = pup.at;
  a.weights = weights.data();
  a.weight_columns = columns;
  a.x_prev = cs.x_prev ? xp.at : nullptr;
  a.nu = cs.nu ? nup.at : nullptr;
  a.noise = cs.noise ? static_cast<const float*>(np.at) : nullptr;
  a.numel_per_sample = cs.numel;
  a.groups_per_sample = groups_per_sample;
  a.total_groups = cs.batch * groups_per_sample;
  // (with the table, a.coef and a.key.step must not matter: poisoned)
  a.coef = table_mode ? StepCoef{kNaN, kNaN, kNaN, kNaN, kNaN, kNaN, kNaN, kNaN, kNaN, kNaN} : *cs.coef;
  a.key = cfgfast::NoiseKey{cfgfast::seed_key0(kernel_seed), cfgfast::seed_key1(kernel_seed),
                            table_mode ? 99u : kernel_step, 1u};
  a.keys = cfgfast::philox_keys(a.key.k0, a.key.k1);
  a.index_offset = offset;
  a.clip = cs.clip ? clip : 0.0f;
  a.has_clip = cs.clip;
  const int64_t t = cs.t;
  a.table = table_mode ? table.data() : nullptr;
  a.step_ptr = table_mode ? &t : nullptr;
  a.table_len = table_mode ? kNumRows : 0;

  const size_t pred_bytes = 4 * psize;
  const bool vectorisable = cfgfast::step_vectorisable(a, pred_bytes);
  CHECK(vectorisable == (pattern == 0 && cs.numel % 4 == 0), "vectorisable with pointer pattern %d numel %lld", pattern,
        static_cast<long long>(cs.numel));
  for (int setting : {1, 2}) {  // what step_cuda.cu launches
    const cfgfast::StepKernel k = cfgfast::step_kernel_for(a, pred_bytes, setting);
    CHECK(k.vec == vectorisable && (k.prev_nu || (!cs.x_prev && !cs.nu)) &&
              k.groups == (k.vec && (cs.x_prev || cs.nu) ? 1 : setting),
          "step_kernel_for: vec %d groups %d prev_nu %d for pattern %d x_prev %d nu %d setting %d", k.vec, k.groups,
          k.prev_nu, pattern, cs.x_prev, cs.nu, setting);
  }
  if (valid) {
    // every input is finite but those the row must not read (NaN): out finite shows none of them was read
    const bool finite = std::all_of(want.out.begin(), want.out.end(), [](float v) { return std::isfinite(v); });
    CHECK(finite, "CPU kernel: a non-finite output from finite inputs (an input it must not read was read)");
  }
  std::vector<cfgfast::StepKernel> kernels;
  for (const bool vec : {false, true}) {
    for (const bool prev_nu : {false, true}) {
      for (const int groups : {1, 2}) {
        if ((vec && !vectorisable) || (!vec && !prev_nu) || (!prev_nu && (cs.x_prev || cs.nu))) continue;
        kernels.push_back(cfgfast::StepKernel{vec, groups, prev_nu});
      }
    }
  }
  int runs = 0;
  for (const cfgfast::StepKernel& k : kernels) {
    for (uint64_t threads : grid_sizes(a.total_groups)) {
      out.fill(std::vector<float>(static_cast<size_t>(total), kUnwritten));
      if (cs.x_prev) xp.fill(in.x_prev);
      run_step_grid(a, cs.type, k, threads);
      ++runs;
      *vec_runs += k.vec;
      *prev_nu_runs += k.prev_nu && (cs.x_prev || cs.nu);
      const int64_t bad = differences(out.at, want.out, total);
      const int64_t bad_prev = cs.x_prev ? differences(xp.at, want.x_prev, total) : 0;
      CHECK(bad == 0 && bad_prev == 0 && out.guard_intact() && xp.guard_intact(),
            "CUDA step on the host: %s batch %lld numel %lld row %lld clip %d x_prev %d nu %d noise %d t %lld "
            "pointers %d vec %d groups %d prev_nu %d threads %llu: %lld of %lld elements of out and %lld of x_prev "
            "differ from the CPU kernel%s",
            type_name(cs.type), static_cast<long long>(cs.batch), static_cast<long long>(cs.numel),
            valid ? static_cast<long long>(cs.coef - kRows) : -1LL, cs.clip, cs.x_prev, cs.nu, cs.noise,
            static_cast<long long>(cs.t), pattern, k.vec, k.groups, k.prev_nu, static_cast<unsigned long long>(threads),
            static_cast<long long>(bad), static_cast<long long>(total), static_cast<long long>(bad_prev),
            out.guard_intact() && xp.guard_intact() ? "" : ", wrote past the end");
    }
  }
  return runs;
}

// The step: every row, with and without clip, x_prev, nu and explicit noise; each ε type; shapes with tails and
// several grid-stride rounds; aligned, all misaligned, and one pointer at a time misaligned where every optional
// input is given; then the coefficient table at each row and at indices outside it (NaN).
void test_step_on_host() {
  const uint64_t seed = 0xfedcba9876543210ull, offset = 7;
  const uint32_t step = 11;
  const float clip = 1.0f;
  std::vector<double> table;
  for (const StepCoef& c : kRows) {
    for (float x : {c.pred_z, c.pred_g, c.mean_z, c.mean_x, c.direct_z, c.direct_g, c.prev, c.uncond, c.noise_std,
                    c.noise_nu}) {
      table.push_back(x);
    }
  }
  const struct {
    int64_t batch, numel;
  } shapes[] = {{1, 1}, {3, 7}, {2, 8}, {4, 37}, {2, 64}, {3, 65}, {2, 1024}, {2, 4097}};
  Rng rng{77};
  int runs = 0, vec_runs = 0, prev_nu_runs = 0;
  for (const auto& shape : shapes) {
    const int64_t total = shape.batch * shape.numel;
    Inputs in;
    for (int64_t i = 0; i < total; ++i) {
      in.z.push_back(static_cast<float>(rng.uniform(-2.0, 2.0)));
      in.noise.push_back(static_cast<float>(rng.uniform(-3.0, 3.0)));
    }
    for (EpsType type : {EpsType::kFloat32, EpsType::kBFloat16, EpsType::kFloat16}) {
      in.pc = make_pred(type, static_cast<size_t>(total), rng);
      in.pu = make_pred(type, static_cast<size_t>(total), rng);
      for (int64_t row = 0; row < kNumRows; ++row) {
        const StepCoef& c = kRows[row];
        // inputs that the row must not read are NaN: x_prev where prev == 0 (a multistep sampler's first step: the
        // state uninitialised), nu and the explicit noise where noise_std == 0
        in.x_prev.assign(static_cast<size_t>(total), kNaN);
        if (c.prev != 0.0f) {
          for (auto& v : in.x_prev) v = static_cast<float>(rng.uniform(-1.5, 1.5));
        }
        in.nu = make_pred(type, static_cast<size_t>(total), rng, c.noise_std == 0.0f);
        Inputs nan_noise = in;
        if (c.noise_std == 0.0f) std::fill(nan_noise.noise.begin(), nan_noise.noise.end(), kNaN);
        for (int mode = 0; mode < 16; ++mode) {
          // (every other call, alternating with the row, with a third weight column)
          const Case cs{type, shape.batch, shape.numel, &c, (mode & 1) != 0, (mode & 2) != 0, (mode & 4) != 0,
                        (mode & 8) != 0, -2, (mode + row) % 2 == 1};
          const bool all = cs.x_prev && cs.nu && cs.noise;
          for (int pattern = 0; pattern < (all ? 2 + kPointers : 2); ++pattern) {
            runs += run_case(cs, nan_noise, pattern, table, seed, step, seed, step, offset, clip, &vec_runs,
                             &prev_nu_runs);
          }
          if (c.noise_std == 0.0f) {
            // no noise: another seed and step give the CPU kernel's bits at the first ones
            runs += run_case(cs, nan_noise, 0, table, seed, step, ~seed, step + 7, offset, clip, &vec_runs,
                             &prev_nu_runs);
          }
        }
      }
      // the table: each row, an index past the end and a negative one (NaN in out and x_prev), with and without
      // clip, with and without x_prev and nu
      in.x_prev.assign(static_cast<size_t>(total), 0.25f);
      in.nu = make_pred(type, static_cast<size_t>(total), rng);
      for (int64_t t : {int64_t{0}, int64_t{1}, int64_t{2}, kNumRows - 1, kNumRows, int64_t{-1}}) {
        const bool valid = t >= 0 && t < kNumRows;
        for (int mode = 0; mode < 4; ++mode) {
          const bool extras = (mode & 2) != 0;
          const Case cs{type, shape.batch, shape.numel, valid ? &kRows[t] : nullptr, (mode & 1) != 0, extras, extras,
                        false, t, (mode + t) % 2 != 0};
          for (int pattern = 0; pattern < 2; ++pattern) {
            runs += run_case(cs, in, pattern, table, seed, step, seed, step, offset, clip, &vec_runs, &prev_nu_runs);
          }
        }
      }
    }
  }
  std::printf("  %d grids run, %d on the vectorised paths, %d with x_prev or nu\n", runs, vec_runs, prev_nu_runs);
  CHECK(vec_runs > 0 && prev_nu_runs > 0, "the vectorised paths or the x_prev and nu paths never ran");
}

// The noise kernel against noise_groups: out aligned and misaligned, vectorised and scalar, every grid size.
void test_noise_on_host() {
  const uint64_t seed = 0xfedcba9876543210ull, offset = 7;
  const cfgfast::NoiseKey key{cfgfast::seed_key0(seed), cfgfast::seed_key1(seed), 11u, 2u};
  int runs = 0, vec_runs = 0;
  for (int64_t batch : {1, 3}) {
    for (int64_t numel : {1, 7, 8, 37, 64, 65, 1024, 4097}) {
      const int64_t total = batch * numel, groups_per_sample = (numel + 3) / 4;
      cfgfast::cpu::set_active_isa(Isa::kScalar);
      std::vector<float> want(static_cast<size_t>(total), kUnwritten);
      const cfgfast::cpu::NoiseArgs args{want.data(), numel, key, offset};
      for (int64_t b = 0; b < batch; ++b) cfgfast::cpu::noise_groups(args, b, 0, groups_per_sample);
      for (int shift = 0; shift < 2; ++shift) {  // out at a 16-byte boundary, and one element past it
        Written out(total, shift);
        for (const bool vec : {false, true}) {
          if (vec && !cfgfast::noise_vectorisable(out.at, numel)) continue;
          CHECK(!vec || (shift == 0 && numel % 4 == 0), "noise vectorisable with shift %d numel %lld", shift,
                static_cast<long long>(numel));
          for (uint64_t threads : grid_sizes(batch * groups_per_sample)) {
            out.fill(std::vector<float>(static_cast<size_t>(total), kUnwritten));
            for (uint64_t t = 0; t < threads; ++t) {
              cfgfast::noise_thread(out.at, numel, groups_per_sample, batch * groups_per_sample, key,
                                    cfgfast::philox_keys(key.k0, key.k1), offset, vec, t, threads);
            }
            ++runs;
            vec_runs += vec;
            CHECK(differences(out.at, want, total) == 0 && out.guard_intact(),
                  "CUDA noise on the host: batch %lld numel %lld shift %d vec %d threads %llu differs from "
                  "noise_groups",
                  static_cast<long long>(batch), static_cast<long long>(numel), shift, vec,
                  static_cast<unsigned long long>(threads));
          }
        }
      }
    }
  }
  std::printf("  %d grids run, %d vectorised\n", runs, vec_runs);
  CHECK(vec_runs > 0, "the vectorised noise path never ran");
}

}  // namespace

int main(int argc, char** argv) {
  const TestCase tests[] = {
      {"step_on_host", test_step_on_host},
      {"noise_on_host", test_noise_on_host},
  };
  return run_tests(tests, argc, argv);
}
