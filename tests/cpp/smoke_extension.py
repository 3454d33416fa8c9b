"""Smoke test of a CMake-built cfgfast._C (registered with ctest by CMakeLists.txt when it is built).

Loads the module from the path given, on its own: importing the cfgfast package would load the package's
own _C as well, and the two would register the same ops twice. The kernels themselves are tested by
test_shared_header (C++) and by the Python test suite; this only checks that the module loads, registers
its ops and runs them.

    python tests/cpp/smoke_extension.py build/cmake/cfgfast/_C.cpython-311-x86_64-linux-gnu.so
"""

import importlib.util
import sys

import torch


def load(path):
    spec = importlib.util.spec_from_file_location("_C", path)  # PyInit__C
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(path):
    ext = load(path)
    info = ext.build_info()
    print("build_info:", info)
    assert info["cpu_kernel"] and info["torch_built_against"] == torch.__version__.split("+")[0], info
    assert ext.philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]

    # the noise of sample b does not depend on its position in the batch (SPEC §3)
    batch = torch.empty(4, 3, 37)
    torch.ops.cfgfast.normal_noise_(batch, 1234, 5, 1, 0)
    single = torch.empty(1, 3, 37)
    torch.ops.cfgfast.normal_noise_(single, 1234, 5, 1, 2)
    assert torch.equal(batch[2:3], single)
    assert batch.isfinite().all() and abs(batch.mean().item()) < 0.2 and abs(batch.std().item() - 1) < 0.2

    # one guided step with explicit noise and a multistep state against the formula of cfgfast/step.h in float64
    gen = torch.Generator().manual_seed(0)
    z, pred_cond, pred_uncond, noise, x_prev = (torch.randn(3, 2, 5, 7, generator=gen) for _ in range(5))
    w = torch.tensor([0.0, 1.5, 4.0])
    weights = torch.stack([1 + w, w], dim=1)
    # StepCoef order: pred_z, pred_g, mean_z, mean_x, direct_z, direct_g, prev, uncond, noise_std, noise_nu
    coef = [1.25, -0.75, 0.6, 0.5, 1.225, -0.375, -0.2, 0.1, 0.3, 0.0]
    out = torch.full_like(z, float("nan"))
    state = x_prev.clone()
    torch.ops.cfgfast.guided_step_(out, z, pred_cond, pred_uncond, weights, state, None, noise, coef, 0, 0, 0, None)
    wb = w.double().view(-1, 1, 1, 1)
    g = (1 + wb) * pred_cond.double() - wb * pred_uncond.double()
    want = (coef[4] * z.double() + coef[5] * g + coef[6] * x_prev.double() + coef[7] * pred_uncond.double()
            + coef[8] * noise.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.double(), coef[0] * z.double() + coef[1] * g, rtol=1e-5, atol=1e-5)
    print("smoke test of", path, "passed")


if __name__ == "__main__":
    main(sys.argv[1])
