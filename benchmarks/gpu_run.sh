#!/usr/bin/env bash
# One prepared run for a short window on a GPU machine (budget ~8 minutes end to end, install
# included). Every part is time-boxed (a slow part is killed, never eats the rest) and skipped when
# the remaining budget cannot hold its time box. Everything goes to one output folder with the
# machine header. No network is needed: attnkit is installed with --no-deps against the machine's
# own torch/triton.
#
#   bash benchmarks/gpu_run.sh [--dry-run] [--out DIR] [--budget SECONDS] [--only a,b] [--skip a,b]
#
# Parts (name: time box in seconds):
#   header 20, install 90, tests 150, sanitizer 75, lightning 60, attention_fwd 45,
#   attention_fwdbwd 60, decode 30, qk_norm 30, loki 30, window 45, paged 30, audit 60 (the
#   static audit under the machine's triton, last: the least important)
# The total budget (default 480 s) is checked before each part. See docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET=480
ONLY=""
SKIP=""
OUT=""
PY="${PYTHON:-python}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    --skip) SKIP="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_run.sh: --budget must be a whole number of seconds, got $BUDGET" >&2; exit 2 ;; esac
if [ -z "$OUT" ]; then
  OUT="bench_results/gpu_run_$(hostname -s 2>/dev/null || echo host)_$(date -u +%Y%m%dT%H%M%SZ)"
fi
BENCH="$OUT/bench"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
N=0

want() {  # want NAME: is the part selected by --only/--skip?
  local name="$1"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 1; fi
  if [ -n "$SKIP" ] && [[ ",$SKIP," == *",$name,"* ]]; then return 1; fi
  return 0
}

part() {  # part NAME TIMEBOX COMMAND...: run COMMAND under `timeout`, log to OUT/NN_NAME.log
  local name="$1" box="$2"; shift 2
  want "$name" || return 0
  N=$((N + 1))
  local log
  log="$OUT/$(printf '%02d' "$N")_${name}.log"
  if [ "$DRY" = 1 ]; then
    printf '[%s, time box %ss] %s\n' "$name" "$box" "$*"
    return 0
  fi
  local now left
  now=$(date +%s)
  left=$((BUDGET - (now - START)))
  if [ "$left" -lt "$box" ]; then
    printf '%-18s SKIPPED (budget: %ss left, time box %ss)\n' "$name" "$left" "$box" | tee -a "$SUMMARY"
    return 0
  fi
  echo "== $name (time box ${box}s): $*" | tee "$log"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$box" bash -c "$*" >>"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status="ok"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMED OUT"; elif [ "$rc" != 0 ]; then status="FAILED rc=$rc"; fi
  printf '%-18s %-14s %4ss  %s\n' "$name" "$status" "$dt" "$log" | tee -a "$SUMMARY"
  tail -n 3 "$log" | sed 's/^/    /'
}

if [ "$DRY" = 1 ]; then
  echo "gpu_run.sh --dry-run: would write to $OUT (budget ${BUDGET}s) and run:"
else
  mkdir -p "$OUT" "$BENCH"
  : > "$SUMMARY"
fi

# Machine header: the context every number needs.
part header 20 "{ date -u; hostname; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20;
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1;
  nvidia-smi -q -d CLOCK,PERFORMANCE 2>&1 | head -40; lscpu 2>/dev/null | head -15;
  $PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"triton\", triton.__version__); p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; print(\"device\", p)';
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>&1; } > $OUT/header.txt 2>&1; cat $OUT/header.txt"

# Install without network against the machine's torch/triton.
part install 90 "$PY -m pip install --no-deps --no-build-isolation -e . && $PY -c 'import attnkit; print(attnkit.__version__)'"

# The CUDA tests that matter most, chosen by parameter value (benchmarks/gpu_pytest_select.py):
# bf16 kernel parity, no recompilation on a new length, the native CUDA kernels. -rfE lists
# failures in the log even if the time box cuts the run short.
part tests 150 "$PY -m pytest -q -rfE -p no:cacheprovider -p benchmarks.gpu_pytest_select --junitxml=$OUT/tests.xml tests/test_*triton*.py tests/test_native.py"

# compute-sanitizer (memcheck) on one small call of each kernel family, where the tool exists.
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
part sanitizer 75 "if [ -x $SAN ]; then $SAN --tool memcheck --error-exitcode 9 --print-limit 20 $PY benchmarks/gpu_smoke.py; else echo 'compute-sanitizer not found: plain smoke run'; $PY benchmarks/gpu_smoke.py; fi"

# Headline benchmark cases (peers are included where installed).
RUN="$PY benchmarks/run.py --dtype bfloat16 --no-plot --out $BENCH"
part lightning 60 "$RUN --op lightning_attention --mode fwd+bwd --B 2 --T 16384 --H 16 --D 128"
part attention_fwd 45 "$RUN --op attention --mode fwd --causal 1 --D 128 --T 4096,16384"
part attention_fwdbwd 60 "$RUN --op attention --mode fwd+bwd --causal 1 --D 128 --T 4096,16384"
part decode 30 "$RUN --op attention_decode --B 8 --S 65536 --D 128"
part qk_norm 30 "$RUN --op qk_norm_attention --T 4096 --D 128"
part loki 30 "$RUN --op loki_decode --B 8 --S 65536 --D 128"
# issue 15: sliding window at fixed W (time vs T/W causal chunks and full causal, cost/full, the
# kernel's key tiles per query tile) and paged vs contiguous decode GB/s
part window 45 "$RUN --op window_attention --T 8192,32768 --W 4096 --H 16 --D 128"
part paged 30 "$RUN --op paged_decode --B 8 --S 65536 --D 128"

# The static audit under this machine's triton (cheap compared to its value: the same figures
# from the GPU's toolchain; the real SM count via torch).
part audit 60 "$PY -m attnkit.tools.gpu_audit --quick --arch sm_90 --summary-only --jobs 4 --json $OUT/gpu_audit.json"

if [ "$DRY" = 1 ]; then
  exit 0
fi
echo "total $(( $(date +%s) - START ))s; results in $OUT" | tee -a "$SUMMARY"
