// The per-sample moments of moments_cpu.cpp, for the ops that need them inside a step (guidance_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace cfgfast::cpu {

// The element types an input may have: the codes moments_avx2.cpp reads.
enum class MomentsDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };
MomentsDtype moments_dtype_of(const at::Tensor& t);

// A sample is cut into chunks of this many elements at fixed offsets; part of the moments' definition (the order
// of their additions), never derived from the thread count or the batch.
constexpr int64_t kMomentsChunk = 8192;
constexpr int kMaxMomentsPerChunk = 4 + 4 * 5 / 2;  // V <= 4: V sums, then the V (V + 1) / 2 products j <= l

// The moments of elements [0, count) of one chunk (count <= kMomentsChunk): src[i] points at the chunk's first
// element of input i (dtype[i], element_size[i] bytes an element), combos[j * k + i] the coefficient of input i in
// v_j. partial[m]: the sum of v_m for m < V, then the products v_j v_l, j <= l, row by row, each the sum of the
// chunk's four lanes as (l0 + l1) + (l2 + l3). A sample's moments are its chunks' partials added in chunk order.
void chunk_moments(const void* const* src, const MomentsDtype* dtype, const int64_t* element_size, int k,
                   const double* combos, int v, int64_t count, double* partial);

}  // namespace cfgfast::cpu
