"""What the GPU kernels compile to, checked without a GPU: 16-byte global loads and stores, no shared-memory
layout shuffles in the Triton kernel, no register spills in the CUDA kernel.

Triton compiles its kernels for an sm_90 target offline (its own ptxas, no driver needed); the CUDA kernel's
machine code is read from the built extension with cuobjdump (the toolkit's, or the one Triton carries). A
regression here is a slower kernel that every correctness test would still pass.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import cfgfast
from cfgfast import _ext

triton = pytest.importorskip("triton")

# Run in a fresh interpreter without TRITON_INTERPRET (which the test session sets on a machine without a GPU:
# interpreted kernels cannot be compiled): compiles every variant and prints what the checks need, as JSON.
_COMPILE = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cfgfast import triton_step

KERNEL = triton_step._guided_step_kernel
TENSORS = ("out_ptr", "z_ptr", "pred_cond_ptr", "pred_uncond_ptr", "x_prev_ptr", "nu_ptr", "noise_ptr")  # z's shape
FLOATS = ("pred_z", "pred_g", "mean_z", "mean_x", "direct_z", "direct_g", "prev", "uncond", "noise_std", "noise_nu",
          "clip")
FLAGS = ("CLIP", "READ_PREV", "WRITE_PREV", "DRAW", "EXPLICIT_NOISE", "NU", "TABLE")


def signature_of(kernel, pred_type="fp32", constants=None):
    signature = {}
    for name in kernel.arg_names:
        if constants and name in constants:
            signature[name] = "constexpr"
        elif name in ("pred_cond_ptr", "pred_uncond_ptr", "nu_ptr"):
            signature[name] = "*" + pred_type
        elif name == "table_ptr":
            signature[name] = "*fp64"
        elif name == "step_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    return signature


# the modes the ops launch: which flags each sets
MODES = {
    "noise": ("DRAW",), "explicit": ("DRAW", "EXPLICIT_NOISE"), "clip": ("DRAW", "CLIP"), "deterministic": (),
    "multistep": ("READ_PREV", "WRITE_PREV"), "sde": ("READ_PREV", "WRITE_PREV", "DRAW"), "nu": ("DRAW", "NU"),
    "table": ("READ_PREV", "WRITE_PREV", "DRAW", "NU", "TABLE"),
}
results = {}
for pred_type in ("fp32", "bf16"):
    for mode, flags in MODES.items():
        constants = {flag: flag in flags for flag in FLAGS}
        constants["BLOCK"] = triton_step.BLOCK_GROUPS
        signature = signature_of(KERNEL, pred_type, constants)
        if set(KERNEL.arg_names) != set(signature) or not set(TENSORS + FLOATS) <= set(signature):
            sys.exit("the kernel's arguments changed: update tests/test_codegen.py")
        names = list(KERNEL.arg_names)
        # as launched on 16-byte aligned inputs whose sample length is a multiple of 16: Triton specialises on both
        aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in TENSORS + ("per_sample",)}
        source = ASTSource(fn=KERNEL, signature=signature, constexprs=constants, attrs=aligned)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": triton_step.NUM_WARPS})
        ptx = kernel.asm["ptx"]
        results[pred_type + "-" + mode] = dict(
            v4_loads=len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v4\.b32", ptx)),
            v4_stores=len(re.findall(r"st\.global(?:\.[a-z0-9]+)*\.v4\.b32", ptx)),
            shuffles=ptx.count("bar.sync") + ptx.count("st.shared"), shared=kernel.metadata.shared)
# Inductor passes an int argument equal to 1 as a constant (do_not_specialize notwithstanding): each kernel must
# compile so, for every int argument that can be 1
for kernel in (KERNEL, triton_step._normal_noise_kernel):
    ints = [name for name in kernel.arg_names if not (name.endswith("_ptr") or name in FLOATS or name.isupper())]
    for one in ints:
        # the plain step, and the table variant where the argument is the table's length (read only there)
        constants = {name: name == "DRAW" or (name == "TABLE" and one == "table_len")
                     for name in kernel.arg_names if name.isupper()}
        if "BLOCK" in constants:
            constants["BLOCK"] = triton_step.BLOCK_GROUPS
        constants[one] = 1
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature_of(kernel, constants=constants),
                                     constexprs=constants),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": triton_step.NUM_WARPS})
            results[f"one-{kernel.fn.__name__}-{one}"] = "ok"
        except Exception as error:
            results[f"one-{kernel.fn.__name__}-{one}"] = f"{type(error).__name__}: {str(error)[-300:]}"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def triton_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr:  # a platform whose triton carries no ptxas
        pytest.skip(f"triton cannot compile for sm_90 here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pred_type", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["noise", "explicit", "clip", "deterministic", "multistep", "sde", "nu", "table"])
def test_triton_step_vectorises_and_needs_no_shared_memory(triton_sm90, pred_type, mode):
    got = triton_sm90[f"{pred_type}-{mode}"]
    # every 32-bit stream (z, float32 model outputs and nu, explicit noise, x_prev) comes in 16-byte loads; bfloat16
    # ones too (8 elements a load)
    fp32 = pred_type == "fp32"
    prev = mode in ("multistep", "sde", "table")
    streams = 1 + 2 * fp32 + (mode == "explicit") + prev + fp32 * (mode in ("nu", "table"))
    assert got["v4_loads"] >= streams, got
    stores = 1 + prev  # z', and x~ into x_prev
    assert got["v4_stores"] >= stores, f"z' (or x~) is not stored 16 bytes at a time: {got}"
    assert got["shuffles"] == 0 and got["shared"] == 0, f"a layout conversion through shared memory: {got}"


def test_triton_kernels_compile_with_an_int_argument_of_1_as_a_constant(triton_sm90):
    """torch.compile (Inductor) makes an int argument whose value is 1 a compile-time constant, so seed=1 reached
    tl.random.philox as a Python int and the kernel failed to compile."""
    ones = {name: result for name, result in triton_sm90.items() if name.startswith("one-")}
    assert {"one-_guided_step_kernel-seed_lo", "one-_guided_step_kernel-seed_hi", "one-_guided_step_kernel-table_len",
            "one-_normal_noise_kernel-noise_stream"} <= set(ones), ones
    assert all(result == "ok" for result in ones.values()), ones


def _cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump")]
    candidates += glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    candidates += glob.glob("/usr/local/cuda*/bin/cuobjdump")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_cuda_kernels_vectorise_and_do_not_spill():
    if _ext.error() is not None or not cfgfast.build_info()["cuda_kernel"]:
        pytest.skip("the CUDA kernel is not built")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's) to read the kernel's machine code")
    sass = subprocess.run([tool, "-sass", _ext.load().__file__], capture_output=True, text=True, check=True).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    assert functions, "no kernels found in the extension"
    # guided_step_kernel<PredT, kVec, kGroups, kPrevNu>: the vectorised ones are ...Lb1ELi<groups>ELb<prev_nu>E
    vectorised = re.compile(r"guided_step_kernel.*Lb1ELi([12])ELb([01])E")
    vectorised_steps = 0
    for body in functions:
        name = body.split("\n", 1)[0].strip()
        # local memory (LDL / STL) in a kernel: registers spilled to the stack
        assert not re.search(r"\b(LDL|STL)\b", body), f"{name} spills registers to local memory"
        if vectorised.search(name):
            vectorised_steps += 1
            assert "LDG.E.128" in body and "STG.E.128" in body, f"{name} does not load and store 16 bytes at a time"
    # (one entry per kernel and architecture built: the default TORCH_CUDA_ARCH_LIST has three)
    kernels = {body.split("\n", 1)[0].strip() for body in functions}
    assert len(kernels) <= 16, f"more kernels than 15 step kernels and the noise kernel (nvcc's time grows): {kernels}"
    assert vectorised_steps >= 9, "expected the vectorised step kernels of 3 dtypes x (1, 2 groups; 1 with x_prev, nu)"
    # occupancy: the vectorised step kernels fit 6 (1 group a thread), 4 (2 groups) or 5 (with x_prev and nu) blocks
    # of 256 threads in an SM's 64K registers, as their __launch_bounds__ ask
    usage = subprocess.run([tool, "-res-usage", _ext.load().__file__], capture_output=True, text=True,
                           check=True).stdout
    registers = [(name, int(count)) for name, count in re.findall(r"Function (\S+):\s*\n?\s*REG:(\d+)", usage)
                 if vectorised.search(name)]
    assert len(registers) == vectorised_steps, f"register counts not found in {usage[:500]}"
    budget = {("1", "0"): 40, ("2", "0"): 64, ("1", "1"): 48}
    over = [(name, count) for name, count in registers
            if count > budget.get(vectorised.search(name).groups(), 0)]
    assert not over, f"vectorised step kernels over their register budget (40 / 64 / 48): {over}"
