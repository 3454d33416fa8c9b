"""Build of cfgfast's compiled extension, cfgfast._C.

The CPU kernel is always built. The CUDA kernels (csrc/cuda/*.cu) are built when torch was built
with CUDA and a CUDA toolkit is found, whether or not this machine has a GPU.

Environment:
  MAX_JOBS=N               parallel compile jobs (ninja), e.g. 2 on a 2-core machine
  CFGFAST_SKIP_CUDA=1      never build the CUDA kernels
  FORCE_CUDA=1             fail unless the CUDA kernels can be built
  TORCH_CUDA_ARCH_LIST     CUDA architectures, default "8.0;8.6;9.0+PTX"
  CUDA_HOME / CUDA_PATH    the toolkit folder (holding bin/nvcc and include/cuda_runtime.h)

Build against the torch you run with: pip install --no-build-isolation .
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;9.0+PTX"


def read_version():
    with open(os.path.join(ROOT, "cfgfast", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def is_toolkit(folder):
    return bool(folder) and os.path.isfile(os.path.join(folder, "bin", "nvcc")) and os.path.isfile(
        os.path.join(folder, "include", "cuda_runtime.h")
    )


def find_cuda_home(torch_cuda):
    """The CUDA toolkit folder, or None.

    torch guesses CUDA_HOME from the nvcc on PATH, which is wrong where that nvcc is a wrapper script
    outside the toolkit; so look for a folder that really holds a toolkit, preferring the version
    torch was built with.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if torch_cuda:
        candidates.append(f"/usr/local/cuda-{torch_cuda}")
    candidates.append("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for folder in candidates:
        if is_toolkit(folder):
            return os.path.realpath(folder)
    return None


def nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_plan(torch):
    """(build CUDA?, cuda_home, reason)."""
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if os.environ.get("CFGFAST_SKIP_CUDA", "0") == "1":
        return False, None, "CFGFAST_SKIP_CUDA=1"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return False, None, "no CUDA sources in csrc/cuda"
    reason = None
    cuda_home = find_cuda_home(torch.version.cuda)
    if not torch.version.cuda:
        reason = f"torch {torch.__version__} was built without CUDA"
    elif cuda_home is None:
        reason = "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    else:
        found = nvcc_version(cuda_home)
        if found is None or found.split(".")[0] != torch.version.cuda.split(".")[0]:
            reason = (
                f"nvcc {found} in {cuda_home} does not match the CUDA {torch.version.cuda} that torch "
                f"{torch.__version__} was built with; install the matching toolkit or torch, or set "
                "CFGFAST_SKIP_CUDA=1"
            )
    if reason is None:
        return True, cuda_home, "toolkit " + cuda_home
    if force:
        sys.exit("cfgfast: FORCE_CUDA=1 but the CUDA kernels cannot be built: " + reason)
    return False, None, reason


def loaded_libstdcxx():
    """The shared libstdc++ this process (which imported torch) runs with, as a link input, on Linux.

    Some toolchains link libstdc++ statically by default (one seen on a GPU machine: /opt/gcc's g++ 13.3). A
    static copy inside the extension has its own, uninitialised locale: its first number written to a stream
    (any error message with a number, built by c10::str) crashed the interpreter. Naming the shared library
    before the compiler's own -lstdc++ resolves every libstdc++ symbol there, as torch's own libraries do.
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libstdc++.so" in line}
    except OSError:
        return []
    paths = sorted(p for p in paths if os.path.isfile(p))
    return paths[:1]


def extensions():
    import torch

    build_cuda, cuda_home, why = cuda_plan(torch)
    if build_cuda:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    note = f"CUDA kernels {'ON' if build_cuda else 'OFF'} ({why})"
    print("cfgfast: " + note)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is the one torch asks for. -fopenmp: at::parallel_for is inline OpenMP code in
    # torch's headers, serial without it; the libgomp it links is the one torch already loaded.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    define_macros = [("CFGFAST_CUDA_NOTE", '"' + note.replace("\\", "/").replace('"', "'") + '"')]
    ext_cls = CppExtension
    extra = {"cxx": cxx_flags}
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        arch = os.environ["TORCH_CUDA_ARCH_LIST"]
        define_macros += [("CFGFAST_WITH_CUDA", "1"), ("CFGFAST_CUDA_ARCH_LIST", f'"{arch}"')]
        extra["nvcc"] = ["-O3", "-lineinfo"]
        ext_cls = CUDAExtension
    ext = ext_cls(
        name="cfgfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] + loaded_libstdcxx(),
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    version=read_version(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
