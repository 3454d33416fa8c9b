// What the CUDA translation unit offers the Python module besides its ops (built with CFGFAST_WITH_CUDA only).
#pragma once

namespace cfgfast {

// The step kernel's groups of four elements per thread and round of its grid-stride loop: 1 or 2, or 0 (the
// default) for the choice by the model outputs' dtype; returns the previous setting. A tuning knob for
// benchmarks/gpu_table.py; the samples do not depend on it.
int set_cuda_groups_per_thread(int n);

// The CUDA kernels' grids: at most n blocks of 256 threads per SM (1 to kMaxBlocksPerSm), or 0 (the default) for
// 128 for the step kernel and 32 for the noise kernel (several waves of the blocks an SM holds at once); returns the
// previous setting. A tuning knob for benchmarks/gpu_table.py; the samples do not depend on it.
constexpr int kMaxBlocksPerSm = 1024;
int set_cuda_blocks_per_sm(int n);

}  // namespace cfgfast
