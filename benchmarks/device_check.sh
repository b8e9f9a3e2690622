#!/usr/bin/env bash
# One command for a GPU lease (15 minutes of device time; this script stays under 8 minutes: a 470 s budget):
#
#   bash benchmarks/device_check.sh                  # on the GPU machine, from the repo root, $OUT set
#   bash benchmarks/device_check.sh --cpu-dry-run    # here, on CPU, tiny sizes: the same flow, no device minute
#
# Steps (each logged with a timestamp and run under `timeout`, so one hang cannot eat the lease):
#   info      nvidia-smi, driver, python/torch/triton/peft versions, GPU name, lora_kernels.backend_info()
#   build     the CUDA extension: `bash csrc/build_inplace.sh` if present, else `setup.py build_ext --inplace`
#             (only when csrc/ has sources); a failed build is reported loudly, the Triton checks still run
#   tests     python3 -m pytest -m gpu tests/ (per-test timeout)                       -> $OUT/gpu_tests.log
#   sanitize  compute-sanitizer memcheck + racecheck on csrc/sanitize_check.py, if both exist -> $OUT/sanitizer.log
#   bench     python3 -m benchmarks.bench_lora --preset gpu-headline (correctness cross-check inside)
#                                                                  -> $OUT/bench.csv, bench.md, bench.png
#   memscale  benchmarks/memory_scale.py --gpu, headline pair first (ours ckpt+chunked CE vs HF Trainer+peft+ckpt,
#             ~1.1B Llama, bf16, 4 x 2048)                         -> $OUT/memory_scale.csv (table in the log)
#   tune      benchmarks/gpu_triton_tune.py --m 8192 1024: autotunes what the Triton auto plan launches (budget 30 s),
#             times every plan's forward and fwd+bwd and the backward (atomic, deterministic, dB-by-launch), checks
#             every plan against the fp64 oracle; in the log
#   bisect    (not by default; GPU run 4 answered it) benchmarks/gpu_unaligned_bisect.py: which kernel / tile /
#             compiler change avoids the Triton unaligned 16-bit fault (RESULT lines in device_check.log; never a FAIL)
#   cutests   (issue 20) pytest -m gpu tests/test_cuda_cublas.py tests/test_cuda_kernels.py: the CUDA plans 'cublas'
#             (new) and 'fused' (moved to cuda/fused.py, csrc/ reformatted)          -> $OUT/gpu_tests.log
#   cusanitize (issue 20) compute-sanitizer memcheck + racecheck on csrc/sanitize_check.py --plan cublas
#                                                                                  -> $OUT/sanitizer.log
#   plans     (issue 20) benchmarks/gpu_plans.py: fwd, bwd, fwd+bwd at M in {16, 1024, 8192}, p in {0, 0.1}, every
#             Triton and CUDA plan and auto next to base / addmm / PEFT, host time per call, the oracle check, and
#             the issue's targets as PASS / MISS lines (in the log)
# Step sets: --steps cuda2 = info,build,cutests,cusanitize,plans (issue 20's measurement, one call < 8 minutes).
# Files under $OUT (at most 8 come back): device_check.log build.log gpu_tests.log sanitizer.log bench.csv (plans.csv: cuda2)
# bench.md bench.png memory_scale.csv. The benchmark's markdown table is printed LAST. Exit status: 0 only if the build (when
# there is one), the GPU tests and the benchmark's correctness cross-check all passed.
#
# Options: --steps info,build,tests,sanitize,bench,memscale,tune[,bisect,cutests,cusanitize,plans] (a subset, in
#   this order; or the set cuda2)   --cpu-dry-run
# Environment: OUT (default: a new temp dir), PYTHON (default python3, or the first python that imports torch),
#   DC_BUDGET_S (total seconds, default 470: one call under 8 minutes; dry run 900), DC_BUILD_S (default 180; dry run 480) / DC_TESTS_S /
#   DC_SANITIZE_S / DC_BENCH_S / DC_MEMSCALE_S / DC_TUNE_S / DC_BISECT_S / DC_CUTESTS_S / DC_CUSANITIZE_S /
#   DC_PLANS_S (per-step caps), DC_TUNE_BUDGET_S
#   (autotuning seconds inside the tune step, default 30),
#   DC_TEST_TIMEOUT (per test, default 90), BENCH_GIT_COMMIT (commit recorded in the CSV when .git is absent),
#   DC_BENCH_ARGS (extra bench_lora arguments, word-split, e.g. "--providers base,torch,triton").
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
DRY=0
STEPS="info,build,tests,sanitize,bench,memscale,tune"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --steps) STEPS="$2"; shift ;;
    --steps=*) STEPS="${1#--steps=}" ;;
    -h|--help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | grep '^#'; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[ "$STEPS" = cuda2 ] && STEPS="info,build,cutests,cusanitize,plans"

if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
  echo "OUT was unset: writing to $OUT"
fi
mkdir -p "$OUT"
LOG="$OUT/device_check.log"

pick_python() {
  local c
  for c in "${PYTHON:-}" python3 python "$ROOT/.venv/bin/python" "$ROOT/../venv/bin/python"; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if "$c" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  return 1
}

FAILS=()
WARNS=()
# The lease budget; a CPU dry run is not lease-bound and compiles on slow shared cores: more time, same flow.
if [ "$DRY" = 1 ]; then BUDGET=${DC_BUDGET_S:-900}; BUILD_CAP=${DC_BUILD_S:-480}; else BUDGET=${DC_BUDGET_S:-470}; BUILD_CAP=${DC_BUILD_S:-180}; fi

ts() { date -u +%H:%M:%S; }
log() { echo "[$(ts) +${SECONDS}s] $*"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }

# What each step needs at least, kept back for it by the steps before it (only for steps that were asked for:
# GPU run 5 ran --steps info,tests,bench and its tests were cut at 92 s, the reserve of sanitize/memscale that
# were not going to run).
declare -A STEP_NEED=([build]=0 [tests]=100 [sanitize]=60 [bench]=90 [memscale]=40 [tune]=40 [bisect]=0
                      [cutests]=90 [cusanitize]=60 [plans]=120)
STEP_ORDER="build tests sanitize bench memscale tune bisect cutests cusanitize plans"

# reserve_after STEP: the seconds the requested steps after STEP need
reserve_after() {
  local s after=0 sum=0
  for s in $STEP_ORDER; do
    if [ "$after" = 1 ] && want "$s"; then sum=$((sum + STEP_NEED[$s])); fi
    [ "$s" = "$1" ] && after=1
  done
  echo "$sum"
}

# step_timeout DEFAULT STEP [EXTRA]: min(DEFAULT, what is left of the budget minus what the later requested steps
# need, minus EXTRA)
step_timeout() {
  local left=$((BUDGET - SECONDS - $(reserve_after "$2") - ${3:-0}))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

run_step() {  # run_step NAME TIMEOUT OUTFILE CMD...  (OUTFILE: '-' = this log, '+path' = append) -> STEP_RC
  local name=$1 to=$2 outf=$3
  shift 3
  if [ "$to" -lt 10 ]; then
    log "=== $name: SKIPPED, only ${to}s of the ${BUDGET}s budget left"
    WARNS+=("$name skipped: out of time budget")
    STEP_RC=124
    return
  fi
  local where=""
  [ "$outf" = - ] || where=" [output: ${outf#+}]"
  log "=== $name (timeout ${to}s): $*$where"
  local t0=$SECONDS
  case "$outf" in
    -) timeout -k 10 "$to" "$@" ;;
    +*) timeout -k 10 "$to" "$@" >> "${outf#+}" 2>&1 ;;
    *) timeout -k 10 "$to" "$@" > "$outf" 2>&1 ;;
  esac
  STEP_RC=$?
  if [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ]; then log "!!! $name TIMED OUT after ${to}s"; fi
  log "--- $name: rc=$STEP_RC ($((SECONDS - t0))s)"
}

main() {
  log "device_check.sh: repo $ROOT, OUT=$OUT, steps=$STEPS, dry_run=$DRY, budget ${BUDGET}s"
  PY=$(pick_python) || { log "FATAL: no python with torch found (set PYTHON=...)"; return 2; }
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
  if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # a CPU dry run even where a GPU exists
    BENCH_PRESET=dry-run
  else
    unset TRITON_INTERPRET  # the real kernels, never the interpreter, on the GPU
    BENCH_PRESET=gpu-headline
  fi
  log "python: $PY"

  if want info; then
    log "=== info"
    date -u
    uname -a
    if command -v nvidia-smi >/dev/null 2>&1; then
      timeout 30 nvidia-smi
      timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    else
      log "nvidia-smi: not on PATH"
    fi
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2 || log "nvcc: not on PATH"
    command -v compute-sanitizer >/dev/null 2>&1 && compute-sanitizer --version | head -3 || log "compute-sanitizer: not on PATH"
    timeout 120 "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
for m in ("triton", "peft", "transformers", "pytest_timeout", "matplotlib"):
    try:
        print(f"{m} {getattr(importlib.import_module(m), '__version__', '?')}")
    except Exception as e:
        print(f"{m}: not importable ({type(e).__name__}: {e})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}  cc {p.major}.{p.minor}  {p.total_memory / 2**30:.1f} GiB  {p.multi_processor_count} SMs")
else:
    print("GPU: none visible to torch")
import lora_kernels
for name, info in lora_kernels.backend_info()["backends"].items():
    print(f"backend {name}: {'available' if info['available'] else 'UNAVAILABLE'} - {info['reason']}")
EOF
    [ $? -eq 0 ] || FAILS+=("info: python/torch/lora_kernels import failed")
  fi

  if want build; then
    local to
    to=$(step_timeout "$BUILD_CAP" build)
    if [ "$DRY" = 0 ] && compgen -G "lora_kernels/_C*.so" >/dev/null; then
      # A warm machine keeps ignored build outputs: never test a stale extension if this build fails.
      log "build: removing stale $(echo lora_kernels/_C*.so)"
      rm -f lora_kernels/_C*.so
    fi
    if [ -f csrc/build_inplace.sh ]; then
      run_step build "$to" "$OUT/build.log" env LORA_KERNELS_CUDA_ARCHS="${LORA_KERNELS_CUDA_ARCHS:-90}" bash csrc/build_inplace.sh
    elif compgen -G "csrc/*.cu" >/dev/null || [ -f csrc/CMakeLists.txt ]; then
      run_step build "$to" "$OUT/build.log" env LORA_KERNELS_CUDA_ARCHS="${LORA_KERNELS_CUDA_ARCHS:-90}" "$PY" setup.py build_ext --inplace
    else
      log "=== build: no CUDA sources in csrc/: nothing to build"
      echo "no CUDA sources in csrc/" > "$OUT/build.log"
      STEP_RC=skip
    fi
    if [ "$STEP_RC" != skip ]; then
      tail -n 25 "$OUT/build.log"
      if [ "$STEP_RC" -ne 0 ]; then
        log "!!!!!!!! CUDA EXTENSION BUILD FAILED (rc=$STEP_RC): see build.log; continuing with the Triton checks"
        FAILS+=("build: CUDA extension build failed (rc=$STEP_RC)")
      elif "$PY" -c "import lora_kernels._C" >>"$OUT/build.log" 2>&1; then
        log "build: lora_kernels._C imports"
      else
        log "!!!!!!!! build returned 0 but lora_kernels._C does not import: see build.log"
        FAILS+=("build: lora_kernels._C not importable after the build")
      fi
    fi
  fi

  if want tests; then
    local to targs=()
    to=$(step_timeout "${DC_TESTS_S:-170}" tests)
    if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
      targs=(--timeout="${DC_TEST_TIMEOUT:-90}")
    else
      log "pytest-timeout not importable: no per-test timeout (the step timeout still applies)"
    fi
    run_step tests "$to" "$OUT/gpu_tests.log" "$PY" -m pytest -m gpu -q tests/ -p no:cacheprovider "${targs[@]}" \
      -rfEs --durations=15
    tail -n 40 "$OUT/gpu_tests.log"
    if [ "$STEP_RC" -eq 5 ]; then
      WARNS+=("tests: no GPU tests collected")
    elif [ "$STEP_RC" -ne 0 ]; then
      log "!!!!!!!! GPU TESTS FAILED (rc=$STEP_RC): see gpu_tests.log"
      FAILS+=("tests: pytest -m gpu failed (rc=$STEP_RC)")
    fi
  fi

  if want sanitize; then
    if [ ! -f csrc/sanitize_check.py ]; then
      log "=== sanitize: csrc/sanitize_check.py does not exist: skipped"
    elif ! command -v compute-sanitizer >/dev/null 2>&1; then
      log "=== sanitize: compute-sanitizer not on PATH: skipped"
    else
      local tool to
      : > "$OUT/sanitizer.log"
      for tool in memcheck racecheck; do
        to=$(step_timeout "${DC_SANITIZE_S:-60}" sanitize "$([ "$tool" = memcheck ] && echo 30 || echo 0)")  # racecheck next
        echo "===== compute-sanitizer --tool $tool" >> "$OUT/sanitizer.log"
        # No caching allocator under memcheck, so an overrun past a tensor's end is not hidden inside its block.
        run_step "sanitize-$tool" "$to" "+$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
          compute-sanitizer --tool "$tool" --error-exitcode 97 --print-limit 50 "$PY" csrc/sanitize_check.py
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Device not supported|error 999" "$OUT/sanitizer.log" | tail -3
        if [ "$STEP_RC" -eq 97 ] || grep -qE "(ERROR|RACECHECK) SUMMARY: [1-9]" "$OUT/sanitizer.log"; then
          log "!!!!!!!! compute-sanitizer $tool reported errors: see sanitizer.log"
          FAILS+=("sanitize: $tool reported errors")
        elif [ "$STEP_RC" -ne 0 ]; then
          log "sanitize-$tool did not complete (rc=$STEP_RC; the machine may refuse the tool): see sanitizer.log"
          WARNS+=("sanitize: $tool did not complete (rc=$STEP_RC)")
        fi
      done
    fi
  fi

  if want bench; then
    local to
    to=$(step_timeout "${DC_BENCH_S:-180}" bench)
    rm -f "$OUT/bench.csv"
    run_step bench "$to" - "$PY" -m benchmarks.bench_lora --preset "$BENCH_PRESET" \
      --csv "$OUT/bench.csv" --md "$OUT/bench.md" --plot "$OUT/bench.png" ${DC_BENCH_ARGS:-}
    if [ "$STEP_RC" -ne 0 ]; then
      log "!!!!!!!! BENCHMARK FAILED (rc=$STEP_RC): correctness mismatch, crash or timeout (see above)"
      FAILS+=("bench: rc=$STEP_RC (correctness mismatch, crash or timeout)")
    fi
  fi

  if want memscale; then
    local to margs=(--gpu)
    to=$(step_timeout "${DC_MEMSCALE_S:-120}" memscale)
    [ "$DRY" = 1 ] && margs=(--dry-run --configs ours-both,hf-peft-ckpt)
    rm -f "$OUT/memory_scale.csv"
    run_step memscale "$to" - "$PY" benchmarks/memory_scale.py "${margs[@]}" --out "$OUT/memory_scale.csv"
    rm -f "$OUT/memory_scale.md"  # the same table is in this log; the 8-file limit on what comes back
    [ "$STEP_RC" -eq 0 ] || WARNS+=("memscale: rc=$STEP_RC (see its lines above)")
  fi

  if want tune; then
    local to targs=(--m 8192 1024 --budget "${DC_TUNE_BUDGET_S:-30}")
    to=$(step_timeout "${DC_TUNE_S:-90}" tune)
    [ "$DRY" = 1 ] && targs=(--dry-run)
    run_step tune "$to" - "$PY" benchmarks/gpu_triton_tune.py "${targs[@]}"
    if [ "$STEP_RC" -eq 1 ]; then
      log "!!!!!!!! gpu_triton_tune: a plan's result missed the torch oracle (MISMATCHES above)"
      FAILS+=("tune: a Triton plan missed the oracle")
    elif [ "$STEP_RC" -ne 0 ]; then
      WARNS+=("tune: rc=$STEP_RC (see its lines above)")
    fi
  fi

  if want bisect; then
    local to dargs=()
    to=$(step_timeout "${DC_BISECT_S:-90}" bisect)
    [ "$DRY" = 1 ] && dargs=(--dry-run)
    run_step bisect "$to" - "$PY" benchmarks/gpu_unaligned_bisect.py "${dargs[@]}"
    [ "$STEP_RC" -eq 0 ] || WARNS+=("bisect: rc=$STEP_RC (informational: see its RESULT lines)")
  fi

  if want cutests; then
    local to targs=()
    to=$(step_timeout "${DC_CUTESTS_S:-150}" cutests)
    "$PY" -c "import pytest_timeout" >/dev/null 2>&1 && targs=(--timeout="${DC_TEST_TIMEOUT:-90}")
    run_step cutests "$to" "+$OUT/gpu_tests.log" "$PY" -m pytest -m gpu -q tests/test_cuda_cublas.py \
      tests/test_cuda_kernels.py -p no:cacheprovider "${targs[@]}" -rfEs --durations=10
    tail -n 30 "$OUT/gpu_tests.log"
    if [ "$STEP_RC" -eq 5 ] || { [ "$DRY" = 1 ] && [ "$STEP_RC" -eq 0 ]; }; then
      WARNS+=("cutests: no GPU test ran (rc=$STEP_RC)")
    elif [ "$STEP_RC" -ne 0 ]; then
      log "!!!!!!!! CUDA PLAN GPU TESTS FAILED (rc=$STEP_RC): see gpu_tests.log"
      FAILS+=("cutests: pytest -m gpu tests/test_cuda_cublas.py tests/test_cuda_kernels.py failed (rc=$STEP_RC)")
    fi
  fi

  if want cusanitize; then
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
      log "=== cusanitize: compute-sanitizer not on PATH: skipped"
      WARNS+=("cusanitize: compute-sanitizer not on PATH")
    else
      local tool to
      for tool in memcheck racecheck; do
        to=$(step_timeout "${DC_CUSANITIZE_S:-60}" cusanitize "$([ "$tool" = memcheck ] && echo 30 || echo 0)")
        echo "===== compute-sanitizer --tool $tool (plan cublas)" >> "$OUT/sanitizer.log"
        run_step "cusanitize-$tool" "$to" "+$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
          compute-sanitizer --tool "$tool" --error-exitcode 97 --print-limit 50 "$PY" csrc/sanitize_check.py --plan cublas
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_check:" "$OUT/sanitizer.log" | tail -2
        if [ "$STEP_RC" -eq 97 ] || [ "$STEP_RC" -eq 1 ]; then
          log "!!!!!!!! compute-sanitizer $tool (plan cublas) reported errors or a wrong result: see sanitizer.log"
          FAILS+=("cusanitize: $tool rc=$STEP_RC")
        elif [ "$STEP_RC" -ne 0 ]; then
          WARNS+=("cusanitize: $tool did not complete (rc=$STEP_RC)")
        fi
      done
    fi
  fi

  if want plans; then
    local to pargs=()
    to=$(step_timeout "${DC_PLANS_S:-200}" plans)
    pargs=(--csv "$OUT/plans.csv")
    [ "$DRY" = 1 ] && pargs+=(--dry-run)
    run_step plans "$to" - "$PY" -m benchmarks.gpu_plans "${pargs[@]}"
    if [ "$STEP_RC" -eq 1 ]; then
      log "!!!!!!!! gpu_plans: a provider missed the fp64 oracle (MISMATCHES above)"
      FAILS+=("plans: a provider missed the oracle")
    elif [ "$STEP_RC" -ne 0 ]; then
      WARNS+=("plans: rc=$STEP_RC (see its lines above)")
    fi
  fi

  log "=== summary (${SECONDS}s of ${BUDGET}s budget)"
  ls -la "$OUT"
  local w f
  for w in "${WARNS[@]}"; do echo "WARN: $w"; done
  for f in "${FAILS[@]}"; do echo "FAIL: $f"; done
  if [ "${#FAILS[@]}" -gt 0 ]; then
    echo "DEVICE CHECK FAILED: ${#FAILS[@]} failure(s)"
  else
    echo "DEVICE CHECK PASSED"
  fi
  if want bench; then
    echo
    if [ -s "$OUT/bench.md" ]; then cat "$OUT/bench.md"; else echo "(no benchmark table was written)"; fi
  fi
  [ "${#FAILS[@]}" -eq 0 ]
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
