"""Shared fixtures: the backends and CPU instruction sets to test, and a skip for tests that need cfgfast._C.

- `@pytest.mark.needs_extension`: skip with the extension's load error when cfgfast._C cannot be imported.
- `cpu_isas`: one test per instruction set this CPU runs, set with cfgfast._C.set_cpu_isa for the test.
- `backend`: "reference", then "cpu" under each instruction set (ids reference, cpu-scalar, cpu-avx2).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU: the Triton kernels run under the interpreter (read when triton defines them, so set it first).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cfgfast  # noqa: E402

from cfgfast import _ext

EXTENSION_ERROR = _ext.error()
CPU_ISAS = [] if EXTENSION_ERROR is not None else list(_ext.load().build_info()["cpu_isa_supported"])
_SKIP_NO_EXTENSION = pytest.mark.skip(reason=f"cfgfast._C cannot be loaded: {EXTENSION_ERROR}")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_extension: skip when the compiled extension cfgfast._C cannot be loaded")
    # CI sets this: there a missing extension is a failure, not a reason to skip the kernel tests.
    if os.environ.get("CFGFAST_REQUIRE_EXTENSION") == "1" and EXTENSION_ERROR is not None:
        raise pytest.UsageError(f"CFGFAST_REQUIRE_EXTENSION=1 but cfgfast._C cannot be loaded: {EXTENSION_ERROR}")


def pytest_collection_modifyitems(config, items):
    if EXTENSION_ERROR is not None:
        for item in items:
            if item.get_closest_marker("needs_extension"):
                item.add_marker(_SKIP_NO_EXTENSION)


def _isa_params():
    # Without the extension, one visible skipped case instead of none, so the report says why.
    return CPU_ISAS or [pytest.param(None, id="cpu-missing", marks=_SKIP_NO_EXTENSION)]


@pytest.fixture(params=_isa_params())
def cpu_isas(request):
    """Each CPU instruction set this machine supports, active for the test; the previous one restored after."""
    previous = _ext.load().set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _ext.load().set_cpu_isa(previous)


# The GPU backends join the battery where a GPU is present (their tests put tensors on "cuda"); without one, the
# step battery (tests/test_step.py) runs the Triton kernel under TRITON_INTERPRET=1 on CPU tensors.
GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in cfgfast.available_backends()]
TRITON_INTERPRETED = (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
                      and importlib.util.find_spec("triton") is not None)


def backend_device(backend: str) -> str:
    """The device a backend's tensors live on: cuda for the GPU backends, cpu for the others and for Triton
    interpreted."""
    return "cuda" if backend == "cuda" or (backend == "triton" and not TRITON_INTERPRETED) else "cpu"


@pytest.fixture(
    params=["reference"] + [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in CPU_ISAS]
    + ([] if CPU_ISAS else [pytest.param(("cpu", None), id="cpu-missing", marks=_SKIP_NO_EXTENSION)])
    + GPU_BACKENDS + ([pytest.param("triton", id="triton-interpreted")] if TRITON_INTERPRETED else [])
)
def backend(request):
    """A backend name for the `backend=` argument; for "cpu", with each instruction set in turn; "cuda" and
    "triton" where a GPU is present, else "triton" under the interpreter on CPU tensors."""
    if isinstance(request.param, str):
        yield request.param
        return
    previous = _ext.load().set_cpu_isa(request.param[1])
    try:
        yield "cpu"
    finally:
        _ext.load().set_cpu_isa(previous)


@pytest.fixture
def device(backend):
    """The device the current backend's tensors live on."""
    return backend_device(backend)





@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP barrier waits make them up to
    80x slower; the test files of tiny models use this for every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
