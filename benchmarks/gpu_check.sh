#!/usr/bin/env bash
# On a fresh GPU machine with its own torch and no network (the device tool's machines), in one call: build
# cfgfast from this tree, run the tests of the GPU backends, print the table of the GPU step (with a sweep of the
# CUDA and Triton block settings), run the kernels under compute-sanitizer memcheck, the step kernels at 64M
# elements under Nsight Compute (where ncu can read the counters), cfgfast.sample against DiTPipeline on a
# DiT-XL/2-shaped model, and the GPU part of the benchmark suite. Each stage has its own time limit, so one that hangs costs only its own stage.
#   bash benchmarks/gpu_check.sh            (logs under $OUT when set, else ./gpu-check/)
#   GPU_CHECK_STAGES="tests table" bash benchmarks/gpu_check.sh     (some stages only; the build always runs)
#   GPU_CHECK_SWEEP=0 ...                                           (the table without the block-setting sweeps)
#   GPU_CHECK_BUDGET=400 ...                                        (seconds for the whole script; default 570)
# Exit status: 0 when every stage ran and passed, 1 when a stage failed (its "!!" line says which), 3 when those
# that ran passed but the budget left some out or cut them short, or a stage's tool cannot run on the machine
# (named near the end, with the command that runs just them).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
LOG="${OUT:-$REPO/gpu-check}"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET
py=$(command -v python3)
status=0
skipped=""
t0=$(date +%s)
stages=" ${GPU_CHECK_STAGES:-table tests memcheck profile dit benchmarks} "
want() { [[ "$stages" == *" $1 "* ]]; }
# The whole script keeps within GPU_CHECK_BUDGET seconds (default 570: the device tool stops a command at 600 s
# and then returns only what is under $OUT): a stage gets at most what is left, and one with under 30 s left is
# skipped, so the stages after a slow one shrink rather than the call dying with its logs.
budget=${GPU_CHECK_BUDGET:-570}
# stage NAME SECONDS LINES COMMAND...: run with a time limit, its output into $LOG/NAME.log and its last LINES
# lines here; a failure is noted and the script goes on
stage() {
  local name=$1 limit=$2 lines=$3
  shift 3
  local left=$(( budget - ($(date +%s) - t0) ))
  if [ "$left" -lt 30 ]; then
    echo "!! $name: skipped, ${left}s left of the ${budget}s budget"; skipped="$skipped $name"; return 1
  fi
  local cut=0
  [ "$limit" -gt "$left" ] && limit=$left && cut=1
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - t0 ))s)"
  timeout -k 10 "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n "$lines" "$LOG/$name.log"
  if { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ $cut -eq 1 ]; then  # 137: killed 10 s after the TERM
    echo "!! $name: cut at the ${budget}s budget (not a failure of its own)"; skipped="$skipped $name"
  elif [ $rc -ne 0 ] && { [ "$name" = memcheck ] || [ "$name" = profile ]; } \
      && grep -qE "Device not supported|LibraryNotLoaded|Failed to initialize the profiler" "$LOG/$name.log"; then
    # (gVisor machines: compute-sanitizer and ncu cannot reach the GPU there)
    echo "!! $name: its tool cannot run on this machine (not a failure of the code)"; skipped="$skipped $name"
  elif [ $rc -ne 0 ]; then
    echo "!! $name: exit status $rc$([ $rc -eq 124 ] && echo ', time limit')"; status=1
  fi
  return $rc
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
"$py" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
nvcc --version | tail -2 | head -1

# This GPU's arch only (minutes saved), with its PTX.
arch=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
export TORCH_CUDA_ARCH_LIST="$arch+PTX" FORCE_CUDA=1
if ! stage build 300 2 "$py" -m pip install --no-build-isolation --no-deps -v .; then
  echo "CUDA build failed: building without the CUDA kernels, so the Triton backend can still be checked"
  # (appended to build.log: the device tool brings back 8 files at most)
  FORCE_CUDA=0 CFGFAST_SKIP_CUDA=1 "$py" -m pip install --no-build-isolation --no-deps -q . >> "$LOG/build.log" 2>&1 || exit 1
fi
# The benchmarks import this tree's cfgfast (their package puts the tree first on sys.path): give it the build.
mkdir -p /tmp/gpu-check && cd /tmp/gpu-check
so=$("$py" -c 'import cfgfast._C as m; print(m.__file__)') && cp "$so" "$REPO/cfgfast/"
"$py" -c 'import cfgfast; print("backends", cfgfast.available_backends()); print(cfgfast.build_info())'
# registers, shared memory and stack of each kernel (spills show as stack)
# (appended to build.log: the device tool brings back 8 files at most)
command -v cuobjdump > /dev/null && cuobjdump -res-usage "$so" 2>&1 | grep -A1 "Function" \
  | grep -o "Function [^:]*\|REG:[0-9]*\|STACK:[0-9]*" | paste - - - | tee -a "$LOG/build.log"

# with pytest-xdist where present: a test that crashes its process is reported and the others still run
xdist=$("$py" -c 'import xdist' 2> /dev/null && echo "-n 12")
# the tests of the GPU backends only (their ids name cuda or triton; CI runs the rest), first: whether the kernels
# are right matters before how fast they are. Two threads a worker: 12 workers of 16 threads each would crawl.
want tests && OMP_NUM_THREADS=2 stage tests 200 25 "$py" -m pytest -q -p no:cacheprovider -rfEs $xdist \
  "$REPO"/tests/test_{step,noise,triton,extension,compile,bad_input,sampler}.py -k "cuda or triton"

sweep=$([ "${GPU_CHECK_SWEEP:-1}" = 1 ] && echo --sweep)
want table && stage table 150 100 "$py" -c "import sys; sys.path.append('$REPO'); from benchmarks.gpu_table import main; main()" \
  $sweep --out "$LOG/gpu_table.json"


cat > memcheck_run.py <<'PY'
import itertools, torch, cfgfast
from cfgfast import _ext
module = _ext.load()
knob = getattr(module, "set_cuda_groups_per_thread", lambda n: 0)
backends = [b for b in ("cuda", "triton") if b in cfgfast.available_backends()]
# both CUDA settings (1 and 2 groups of four a thread), each in the default grid and in 1 block an SM; (3, 1000003)
# in the latter: several grid-stride rounds, a partial last
blocks_knob = getattr(module, "set_cuda_blocks_per_sm", lambda n: 0)
sde = cfgfast.step_table("dpmpp_2m_sde", cfgfast.sampling_lambdas(8))
ddpm_lv = cfgfast.step_table("ddpm", cfgfast.sampling_lambdas(8), learned_variance=True)
for groups, blocks, shape, dt in itertools.product((1, 2), (0, 1), [(3, 7), (5, 4097), (2, 3, 64, 64), (3, 1_000_003)],
                                                   (torch.float32, torch.bfloat16, torch.float16)):
    knob(groups)
    blocks_knob(blocks)
    z = torch.randn(shape, device="cuda")
    e = torch.randn(shape, device="cuda").to(dt)
    # misaligned base pointers: the scalar path, even where the sample length is a multiple of 4
    zu = torch.empty(z.numel() + 1, device="cuda")[1:].view(shape).copy_(z)
    eu = torch.empty(z.numel() + 1, device="cuda", dtype=dt)[1:].view(shape).copy_(e)
    # (the knobs are the CUDA kernels': the Triton ones run once, in the first setting)
    here = [b for b in backends if b == "cuda" or (groups, blocks) == (1, 0)]
    for kw, backend in itertools.product(({}, {"clip": 1.0}, {"last": True}, {"noise": torch.randn_like(z)}), here):
        cfgfast.reverse_step(z, e, e, -1.0, 0.0, 2.0, backend=backend, **kw)
        cfgfast.reverse_step(zu, eu, eu, -1.0, 0.0, 2.0, backend=backend, **kw)
    for backend in here:
        cfgfast.normal_noise(shape, 3, device="cuda", backend=backend)
    # the optional inputs (on CUDA the kernel with x_prev and nu, or the scalar one): a multistep sampler's state
    # with noise, and a learned variance; both the state aligned and one element past a 16-byte boundary
    nu = (2 * torch.rand(shape, device="cuda") - 1).to(dt)
    xp = torch.zeros_like(z)
    xpu = torch.zeros(z.numel() + 1, device="cuda")[1:].view(shape)
    for row, backend in itertools.product((sde[3], ddpm_lv[3]), here):
        cfgfast.guided_step(z, e, e, row, 2.0, x_prev=xp, nu=nu, backend=backend)
        cfgfast.guided_step(zu, eu, eu, row, 2.0, x_prev=xpu, nu=nu, backend=backend)
knob(0)
blocks_knob(0)
if "cuda" in backends:
    table = cfgfast.step_table("ddpm", cfgfast.sampling_lambdas(4), v=0.3).cuda()
    for t in range(5):  # t = 4 is outside the table: NaN, not a wild read
        out = cfgfast.guided_step_table(z, z, z, table, torch.tensor([t], device="cuda"), 1.0, backend="cuda")
        assert torch.isnan(out).all() == (t == 4), t
torch.cuda.synchronize()
print("memcheck script done")
PY
if ! want memcheck; then
  :
elif command -v compute-sanitizer > /dev/null; then
  # without torch's caching allocator, so that an access just past a tensor is outside any allocation
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage memcheck 150 6 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$py" memcheck_run.py
else
  echo "!! compute-sanitizer not found"; status=1
fi

# (ncu_profile.py, memcheck_run.py: a script named profile.py in the working folder shadowed the standard library's
# profile module, which cProfile imports, and broke torch.compile and pytest-benchmark after it)
# Where the step's time goes, from the hardware counters: how busy the SMs' issue slots and pipes are against the
# memory system, the occupancy, and why warps stall. The CUDA step, then a small Triton step (its compile), then
# the Triton step, all matched by the kernel-name filter; float32 eps, 64M elements, the noise drawn.
cat > ncu_profile.py <<'PY'
import torch, cfgfast
z = torch.randn(1024, 65536, device="cuda")
# two eps tensors, as the table times (one passed twice would be read from DRAM once: 12 bytes an element, not 16)
ec, eu = torch.randn_like(z), torch.randn_like(z)
out = torch.empty_like(z)
for backend in [b for b in ("cuda", "triton") if b in cfgfast.available_backends()]:
    if backend == "triton":
        cfgfast.reverse_step(z[:1, :64], ec[:1, :64], eu[:1, :64], -1.0, 0.0, 2.0, backend="triton")
    cfgfast.reverse_step(z, ec, eu, -1.0, 0.0, 2.0, seed=1, step=3, backend=backend, out=out)
torch.cuda.synchronize()
print("profile script done")
PY
if want profile && command -v ncu > /dev/null; then
  stage profile 150 0 ncu --clock-control none -k regex:guided_step --launch-count 3 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section LaunchStats "$py" ncu_profile.py
  grep -E "guided_step|Throughput|Pipe|pipeline|Issue|Eligible|Occupancy|Registers|Stall|Warp Cycles|Duration|Executed Ipc|Block Limit|Waves" \
    "$LOG/profile.log" 2> /dev/null | grep -v "^==PROF==" | head -90
elif want profile; then
  echo "(ncu not found: no profile)"
fi

# cfgfast.sample (eager and CUDA graph) against DiTPipeline's loop on DiT-XL/2 in float16, batch 4 and 32, 50 steps,
# with the transformer's passes alone (benchmarks/test_dit_speed.py); before the benchmarks stage, which the budget
# cuts first. diffusers is not in the machines' image: it comes as wheels in $REPO/.whl (diffusers and
# importlib_metadata, `pip download --no-deps`), carried with the call.
if want dit && ! "$py" -c "import diffusers" 2> /dev/null && ls "$REPO"/.whl/diffusers-*.whl > /dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check/site "$REPO"/.whl/*.whl \
    && export PYTHONPATH="/tmp/gpu-check/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if want dit && ! "$py" -c "import diffusers" 2> /dev/null; then
  echo "!! dit: diffusers is not installed here and no wheel of it is in $REPO/.whl"; skipped="$skipped dit"
elif want dit; then
  stage dit 90 12 "$py" -m pytest -q -p no:cacheprovider --tb=short "$REPO"/benchmarks/test_dit_speed.py \
    --benchmark-only --benchmark-min-rounds 3 --benchmark-max-time 0.5
  sed -n '/against DiTPipeline/,/^---/p' "$LOG/dit.log" | grep -v "^---"
fi

# (torch.compile with torch.randn, the "fallback" variant, and compiles at the 16M / 64M sizes are left out here:
# each compile costs half a minute; gpu_table covers those sizes)
want benchmarks && stage benchmarks 300 0 "$py" -m pytest -q -p no:cacheprovider "$REPO"/benchmarks/test_{step,sample,guidance,moments}_speed.py \
  --benchmark-only -k "(cuda or triton) and not fallback and not (compiled and (16M or 64M))" \
  --benchmark-max-time 0.3 --benchmark-json "$LOG/benchmarks.json"
want benchmarks && sed -n '/cfgfast step speed/,$p' "$LOG/benchmarks.log"
# the guidance methods against the plain step in alternating rounds, on each GPU backend
for backend in cuda triton; do
  want benchmarks && stage "ratio_$backend" 60 7 "$py" "$REPO"/benchmarks/guidance_ratio.py --backend "$backend" --rounds 8
done
# (the device tool brings back 8 files at most: with every stage run, the DiT and ratio logs go inside benchmarks.log)
for extra in dit ratio_cuda ratio_triton; do
  if [ -f "$LOG/$extra.log" ] && [ -f "$LOG/benchmarks.log" ]; then
    { echo; echo "==== $extra"; cat "$LOG/$extra.log"; } >> "$LOG/benchmarks.log" && rm "$LOG/$extra.log"
  fi
done
if [ -n "$skipped" ]; then
  echo "!! not run, or cut, for lack of time or a tool that cannot run here:$skipped (GPU_CHECK_STAGES=\"${skipped# }\" bash benchmarks/gpu_check.sh runs them)"
  [ "$status" -eq 0 ] && status=3
fi
echo "== done in $(( $(date +%s) - t0 ))s, status $status"
exit $status
