#!/usr/bin/env bash
# On a fresh GPU machine with its own torch and no network (the device tool's machines): build cfgfast
# from this tree, run the whole test suite (the cuda and triton backends join the battery there), the
# noise and step kernels under compute-sanitizer memcheck, and print one table of the GPU step.
#   bash benchmarks/gpu_check.sh            (logs under $OUT when set, else ./gpu-check/)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
LOG="${OUT:-$REPO/gpu-check}"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
py=$(command -v python3)
status=0
step() { echo "== $*"; }

step "build ($("$py" -c 'import torch; print(torch.__version__)'), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
# arch of this GPU only: minutes saved; PTX of it too
arch=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
if ! TORCH_CUDA_ARCH_LIST="$arch+PTX" FORCE_CUDA=1 "$py" -m pip install --no-build-isolation --no-deps -q . \
    > "$LOG/build.log" 2>&1; then
  tail -40 "$LOG/build.log"; echo "build failed"; exit 1
fi
cd "$LOG"  # import the installed package, not $REPO/cfgfast

step "tests"
"$py" -m pytest "$REPO/tests" -q -p no:cacheprovider 2>&1 | tee tests.log | tail -15 || status=1

step "compute-sanitizer memcheck"
cat > memcheck.py <<'PY'
import torch, cfgfast
for shape in [(3, 7), (5, 4097), (2, 3, 64, 64)]:
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        z = torch.randn(shape, device="cuda")
        e = torch.randn(shape, device="cuda").to(dt)
        for kw in ({}, {"clip": 1.0}, {"last": True}, {"noise": torch.randn(shape, device="cuda")}):
            for backend in [b for b in ("cuda", "triton") if b in cfgfast.available_backends()]:
                cfgfast.reverse_step(z, e, e, -1.0, 0.0, 2.0, backend=backend, **kw)
                # misaligned base pointers (the scalar path even where the sample length is a multiple of 4)
                zu = torch.empty(z.numel() + 1, device="cuda")[1:].view(shape).copy_(z)
                eu = torch.empty(z.numel() + 1, device="cuda", dtype=dt)[1:].view(shape).copy_(e)
                cfgfast.reverse_step(zu, eu, eu, -1.0, 0.0, 2.0, backend=backend, **kw)
    cfgfast.normal_noise(shape, 3, device="cuda")
table = cfgfast.coefficient_table(cfgfast.sampling_lambdas(4), 0.3).cuda()
for t in range(5):  # t = 4 is outside the table: NaN, not a wild read
    out = cfgfast.reverse_step_table(z, z, z, table, torch.tensor([t], device="cuda"), 1.0, backend="cuda")
    assert torch.isnan(out).all() == (t == 4), t
torch.cuda.synchronize()
print("memcheck script done")
PY
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 "$py" memcheck.py 2>&1 | tee memcheck.log | tail -5 || status=1
else
  echo "compute-sanitizer not found"; status=1
fi

step "table"
# the installed cfgfast first on the path, this tree's benchmarks package after it
"$py" -c "import sys; sys.path.append('$REPO'); from benchmarks.gpu_table import main; main()" --out gpu_table.json \
  2>&1 | tee gpu_table.txt || status=1
exit $status
