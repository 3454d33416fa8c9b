// cfgfast::sample_moments on the CPU: per sample, the sums and the Gram matrix of V linear combinations
// v_j = sum_i c_ji t_i of K tensors (cfgfast/moments.py holds the float64 torch reference and the definition).
//
// One pass over the inputs, in float64. A sample is cut into chunks of kChunk elements at fixed offsets; a chunk is
// one task (any thread); its elements are widened exactly to float64 (AVX2: in registers, where all inputs have one
// type; otherwise, and in the scalar code, in pieces of kPiece elements into a buffer) and element n of the chunk is
// added into lane n mod 4 of each moment's four accumulators (AVX2: one register; scalar: the same four doubles, the
// same additions, so both give the same bits), and the lanes are combined as (l0 + l1) + (l2 + l3). The chunks'
// partial sums are then added in chunk order. So a sample's moments depend on that sample alone: not on the batch,
// its split, the number of threads or the instruction set.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernel.h"
#include "moments.h"
#include "op_checks.h"

// (after the includes: it applies to the functions below, not to torch's headers) v_j and the products stay two
// roundings each, as in moments_avx2.cpp, also where the baseline target has fused multiply-adds (aarch64)
#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace cfgfast {
namespace cpu {

#if defined(CFGFAST_HAVE_AVX2)
// moments_avx2.cpp: elements [0, count) of inputs all of type `dtype`, whole groups of four from 0 on; it returns
// where it stopped.
int64_t moments_accumulate_avx2(const void* const* src, int dtype, int k, const double* combos, int v, int64_t count,
                                double* acc);
#endif

namespace {

constexpr int kMaxInputs = kMaxMomentInputs;
constexpr int kMaxMoments = kMaxMomentsPerChunk;
constexpr int64_t kChunk = kMomentsChunk;  // (8192 elements: tens of microseconds of work a task)
constexpr int64_t kPiece = 512;  // widened to float64 into a buffer at once: K x 4 KiB, in L1
static_assert(kChunk % kPiece == 0 && kPiece % 4 == 0, "pieces start at a lane-0 element");
// Below about this many elements a second thread costs more than it saves (as ops_cpu.cpp).
constexpr int64_t kMinElementsPerThread = 65536;

inline double widen(double x) { return x; }

template <class T>
void widen_scalar(const void* src, int64_t count, double* dst) {
  const auto* p = static_cast<const T*>(src);
  for (int64_t n = 0; n < count; ++n) dst[n] = static_cast<double>(widen(p[n]));
}

void widen_piece(const void* src, MomentsDtype dtype, int64_t count, double* dst) {
  switch (dtype) {
    case MomentsDtype::kBFloat16: return widen_scalar<bf16_t>(src, count, dst);
    case MomentsDtype::kFloat16: return widen_scalar<f16_t>(src, count, dst);
    case MomentsDtype::kFloat64: return widen_scalar<double>(src, count, dst);
    default: return widen_scalar<float>(src, count, dst);
  }
}

// Elements [n0, count) of x[0..K) added into acc[4 m + lane], lane = n mod 4: m < V the sums of v_m, then the
// products v_j v_l, j <= l, row by row. moments_avx2.cpp's accumulate, one lane at a time.
template <int K, int V>
void accumulate_scalar(const double* const* x, const double* combos, int64_t n0, int64_t count, double* acc) {
  for (int64_t n = n0; n < count; ++n) {
    const int64_t lane = n & 3;
    double v[V];
    for (int j = 0; j < V; ++j) {
      double s = combos[j * K] * x[0][n];
      for (int i = 1; i < K; ++i) s = s + combos[j * K + i] * x[i][n];
      v[j] = s;
      acc[4 * j + lane] += s;
    }
    int p = V;
    for (int j = 0; j < V; ++j) {
      for (int l = j; l < V; ++l, ++p) acc[4 * p + lane] += v[j] * v[l];
    }
  }
}

using AccumulateScalar = void (*)(const double* const*, const double*, int64_t, int64_t, double*);

template <int K>
AccumulateScalar scalar_for_v(int v) {
  switch (v) {
    case 1: return accumulate_scalar<K, 1>;
    case 2: return accumulate_scalar<K, 2>;
    case 3: return accumulate_scalar<K, 3>;
    default: return accumulate_scalar<K, 4>;
  }
}

AccumulateScalar scalar_for(int k, int v) {
  switch (k) {
    case 1: return scalar_for_v<1>(v);
    case 2: return scalar_for_v<2>(v);
    case 3: return scalar_for_v<3>(v);
    default: return scalar_for_v<4>(v);
  }
}

}  // namespace

MomentsDtype moments_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return MomentsDtype::kBFloat16;
    case at::kHalf: return MomentsDtype::kFloat16;
    case at::kDouble: return MomentsDtype::kFloat64;
    default: return MomentsDtype::kFloat32;
  }
}

void chunk_moments(const void* const* src, const MomentsDtype* dtype, const int64_t* element_size, int k,
                   const double* combos, int v, int64_t count, double* partial) {
  double acc[4 * kMaxMoments] = {};
  int64_t done = 0;  // elements of the chunk added up (a multiple of 4: the pieces below keep the lanes)
#if defined(CFGFAST_HAVE_AVX2)
  const bool avx2 = active_isa() == Isa::kAvx2;
  const bool one_dtype = std::all_of(dtype, dtype + k, [&](MomentsDtype d) { return d == dtype[0]; });
  if (avx2 && one_dtype) done = moments_accumulate_avx2(src, static_cast<int>(dtype[0]), k, combos, v, count, acc);
#endif
  alignas(32) double piece[kMaxInputs][kPiece];
  const double* x[kMaxInputs] = {piece[0], piece[1], piece[2], piece[3]};
  const AccumulateScalar scalar = scalar_for(k, v);
  for (int64_t p0 = done; p0 < count; p0 += kPiece) {
    const int64_t n = std::min(kPiece, count - p0);
    for (int i = 0; i < k; ++i) widen_piece(static_cast<const char*>(src[i]) + p0 * element_size[i], dtype[i], n, piece[i]);
    int64_t piece_done = 0;
#if defined(CFGFAST_HAVE_AVX2)
    if (avx2) {
      const void* widened[kMaxInputs] = {piece[0], piece[1], piece[2], piece[3]};
      piece_done = moments_accumulate_avx2(widened, static_cast<int>(MomentsDtype::kFloat64), k, combos, v, n, acc);
    }
#endif
    scalar(x, combos, piece_done, n, acc);
  }
  const int moments = v + v * (v + 1) / 2;
  for (int m = 0; m < moments; ++m) partial[m] = (acc[4 * m] + acc[4 * m + 1]) + (acc[4 * m + 2] + acc[4 * m + 3]);
}

}  // namespace cpu

namespace {

at::Tensor sample_moments_cpu(at::TensorList inputs, c10::ArrayRef<double> combos, int64_t num_vectors) {
  check_moments_args(inputs, combos, num_vectors);
  TORCH_CHECK_VALUE(inputs[0].device().is_cpu(), "cfgfast: the cpu kernel needs CPU tensors, got inputs on ",
                    inputs[0].device());
  const int k = static_cast<int>(inputs.size()), v = static_cast<int>(num_vectors);
  const int moments = v + v * (v + 1) / 2;
  const int64_t batch = inputs[0].size(0);
  const int64_t n_per = batch == 0 ? 0 : inputs[0].numel() / batch;
  // C order over each sample: the lanes and chunks count elements so, whatever the memory format
  std::vector<at::Tensor> data;
  const void* src[cpu::kMaxInputs] = {};
  cpu::MomentsDtype dtype[cpu::kMaxInputs] = {};
  int64_t element_size[cpu::kMaxInputs] = {};
  for (int i = 0; i < k; ++i) {
    data.push_back(inputs[i].contiguous());
    src[i] = data.back().const_data_ptr();
    dtype[i] = cpu::moments_dtype_of(data.back());
    element_size[i] = data.back().element_size();
  }
  const int64_t chunks = (n_per + cpu::kChunk - 1) / cpu::kChunk;
  std::vector<double> partials(static_cast<size_t>(batch * chunks * moments));
  const int64_t per_task = std::min(n_per, cpu::kChunk);
  const int64_t grain = per_task == 0 ? 1 : (cpu::kMinElementsPerThread + per_task - 1) / per_task;
  at::parallel_for(0, batch * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, n0 = (task % chunks) * cpu::kChunk;
      const void* at_n0[cpu::kMaxInputs] = {};
      for (int i = 0; i < k; ++i) at_n0[i] = static_cast<const char*>(src[i]) + (b * n_per + n0) * element_size[i];
      cpu::chunk_moments(at_n0, dtype, element_size, k, combos.data(), v, std::min(cpu::kChunk, n_per - n0),
                         partials.data() + task * moments);
    }
  });
  at::Tensor out = at::empty({batch, num_vectors, num_vectors + 1}, inputs[0].options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b) {
    double total[cpu::kMaxMoments] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const double* partial = partials.data() + (b * chunks + c) * moments;
      for (int m = 0; m < moments; ++m) total[m] += partial[m];
    }
    double* row = o + b * v * (v + 1);  // out[b]: [V, V + 1]
    int p = v;
    for (int j = 0; j < v; ++j) {
      row[j * (v + 1) + v] = total[j];
      for (int l = j; l < v; ++l, ++p) row[j * (v + 1) + l] = row[l * (v + 1) + j] = total[p];
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cfgfast, CPU, m) { m.impl("sample_moments", &sample_moments_cpu); }

}  // namespace cfgfast
