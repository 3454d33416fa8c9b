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

POINTERS = ("out_ptr", "z_ptr", "eps_cond_ptr", "eps_uncond_ptr", "w_ptr", "noise_ptr")
results = {}
for eps_type in ("fp32", "bf16"):
    for mode in ("noise", "explicit", "clip", "last", "loads-first", "prefetch", "prefetch-explicit"):
        signature = {name: "*fp32" for name in POINTERS}
        signature.update(eps_cond_ptr="*" + eps_type, eps_uncond_ptr="*" + eps_type)
        signature.update({name: "fp32" for name in ("alpha", "sigma", "mean_z", "mean_eps", "mean_z_clip",
                                                     "mean_x_clip", "noise_std", "clip")})
        signature.update(seed_lo="i32", seed_hi="i32", step="i32", index_offset="i32", per_sample="i32",
                         blocks_per_sample="i32", prefetch_ahead="i32")
        constants = dict(HAS_NOISE=mode.endswith("explicit"), CLIP=mode == "clip", LAST=mode == "last",
                         BLOCK=triton_step.BLOCK_GROUPS, LOADS_FIRST=mode == "loads-first",
                         PREFETCH=mode.startswith("prefetch"))
        signature.update({name: "constexpr" for name in constants})
        names = list(signature)
        if names != triton_step._reverse_step_kernel.arg_names:
            sys.exit("the kernel's arguments changed: update tests/test_codegen.py")
        # as launched on 16-byte aligned inputs whose sample length is a multiple of 16: Triton specialises on both
        aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in POINTERS + ("per_sample",)}
        source = ASTSource(fn=triton_step._reverse_step_kernel, signature=signature, constexprs=constants,
                           attrs=aligned)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": triton_step.NUM_WARPS})
        ptx = kernel.asm["ptx"]
        results[eps_type + "-" + mode] = dict(
            v4_loads=len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v4\.b32", ptx)),
            v4_stores=len(re.findall(r"st\.global(?:\.[a-z0-9]+)*\.v4\.b32", ptx)),
            shuffles=ptx.count("bar.sync") + ptx.count("st.shared"), shared=kernel.metadata.shared,
            prefetches=ptx.count("prefetch.global.L2"))
# Inductor passes an int argument equal to 1 as a constant (do_not_specialize notwithstanding): each kernel must
# compile so, for every int argument that can be 1
FLOATS = ("alpha", "sigma", "mean_z", "mean_eps", "mean_z_clip", "mean_x_clip", "noise_std", "clip")
FLAGS = dict(HAS_NOISE=False, CLIP=False, LAST=False, BLOCK=triton_step.BLOCK_GROUPS, LOADS_FIRST=False, PREFETCH=False)
for kernel in (triton_step._reverse_step_kernel, triton_step._normal_noise_kernel):
    ints = [name for name in kernel.arg_names if not (name.endswith("_ptr") or name in FLOATS or name.isupper())]
    for one in ints:
        signature, constants = {}, {}
        for name in kernel.arg_names:
            if name == one:
                signature[name], constants[name] = "constexpr", 1
            elif name.isupper():  # (prefetch_ahead is read only with PREFETCH)
                signature[name] = "constexpr"
                constants[name] = one == "prefetch_ahead" if name == "PREFETCH" else FLAGS[name]
            else:
                signature[name] = "*fp32" if name.endswith("_ptr") else "fp32" if name in FLOATS else "i32"
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
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


@pytest.mark.parametrize("eps_type", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["noise", "explicit", "clip", "last", "loads-first", "prefetch", "prefetch-explicit"])
def test_triton_step_vectorises_and_needs_no_shared_memory(triton_sm90, eps_type, mode):
    got = triton_sm90[f"{eps_type}-{mode}"]
    # every 32-bit stream (z, fp32 eps, explicit noise) comes in 16-byte loads; bf16 eps too (8 elements a load)
    streams = 1 + 2 * (eps_type == "fp32") + mode.endswith("explicit")
    # PREFETCH: the L2 prefetch of z, both eps (and the explicit noise) for each group a thread holds; none without
    if mode.startswith("prefetch"):
        from cfgfast import triton_step

        groups_per_thread = triton_step.BLOCK_GROUPS // (32 * triton_step.NUM_WARPS)
        assert got["prefetches"] == (3 + mode.endswith("explicit")) * groups_per_thread, got
    else:
        assert got["prefetches"] == 0, got
    assert got["v4_loads"] >= streams, got
    assert got["v4_stores"] >= 1, f"z' is not stored 16 bytes at a time: {got}"
    assert got["shuffles"] == 0 and got["shared"] == 0, f"a layout conversion through shared memory: {got}"


def test_triton_kernels_compile_with_an_int_argument_of_1_as_a_constant(triton_sm90):
    """torch.compile (Inductor) makes an int argument whose value is 1 a compile-time constant, so seed=1 reached
    tl.random.philox as a Python int and the kernel failed to compile."""
    ones = {name: result for name, result in triton_sm90.items() if name.startswith("one-")}
    assert {"one-_reverse_step_kernel-seed_lo", "one-_reverse_step_kernel-seed_hi", "one-_reverse_step_kernel-prefetch_ahead",
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
    vectorised_steps = prefetch_steps = 0
    for body in functions:
        name = body.split("\n", 1)[0].strip()
        # local memory (LDL / STL) in a kernel: registers spilled to the stack
        assert not re.search(r"\b(LDL|STL)\b", body), f"{name} spills registers to local memory"
        if "reverse_step_kernel" in name and re.search(r"Lb1ELi[12]E", name):  # the 16-byte (kVec) variants
            vectorised_steps += 1
            assert "LDG.E.128" in body and "STG.E.128" in body, f"{name} does not load and store 16 bytes at a time"
        # the L2 prefetch (prefetch.global.L2: CCTL ... PF2) in the kernels with kPrefetch, and in no other
        prefetches = re.search(r"\bCCTL\S*\.PF2\b", body) is not None
        if "reverse_step_kernel" in name and re.search(r"Lb1ELi[12]ELb1E", name):
            prefetch_steps += 1
            assert prefetches, f"{name} has no L2 prefetch"
        else:
            assert not prefetches, f"{name} prefetches into L2"
    assert vectorised_steps >= 12, "expected the vectorised step kernels of 3 eps dtypes x 1, 2 groups x prefetch or not"
    assert prefetch_steps >= 6, "expected the prefetching step kernels of 3 eps dtypes x 1, 2 groups"
    # occupancy: the vectorised step kernels (with or without the prefetch) fit 6 (1 group a thread) or 4 (2 groups)
    # blocks of 256 threads in an SM's 64K registers, as their __launch_bounds__ ask
    usage = subprocess.run([tool, "-res-usage", _ext.load().__file__], capture_output=True, text=True,
                           check=True).stdout
    # (one entry per kernel and architecture built: the default TORCH_CUDA_ARCH_LIST has three)
    registers = [(name, int(count)) for name, count in re.findall(r"Function (\S+):\s*\n?\s*REG:(\d+)", usage)
                 if "reverse_step_kernel" in name and re.search(r"Lb1ELi[12]E", name)]
    assert len(registers) == vectorised_steps, f"register counts not found in {usage[:500]}"
    over = [(name, count) for name, count in registers if count > (40 if "Lb1ELi1E" in name else 64)]
    assert not over, f"vectorised step kernels over their register budget (40 / 64): {over}"

