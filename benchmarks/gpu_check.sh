#!/usr/bin/env bash
# The first run on a GPU box, in one command: a fresh venv, the GPU extras, the gpu-marked tests with compiled kernels,
# the ahead-of-time compile check, the kernel benchmarks, fp32/fp16 TensorRT engines, the bench of every backend and a
# Triton model repository. Every result and log goes into one folder; every step has a time limit, and the whole run
# a budget (15 minutes by default, meant to be enough on an H100 host: the limits below are guesses until then).
#
#   bash benchmarks/gpu_check.sh                      # results in ./gpu-check-<date>/ (summary.md, summary.tsv)
#   bash benchmarks/gpu_check.sh --out DIR --budget 900 --reuse-venv --skip kernel-bench,bench --only ...
#
# Steps marked cpu also run on a machine without a GPU; steps marked gpu then fail at once with the reason (no driver,
# no CUDA device seen by torch, ...), and the run goes on. Exit status: 0 when every step ran and passed, 1 otherwise.
# Environment: GPU_CHECK_ARCH (default fashion-fine) and GPU_CHECK_PRESET (default tiny) choose the bundle exported
# and benchmarked; TRITON_TENSORRT_VERSION, the TensorRT of the Triton server that will load the plans (default: the
# TensorRT installed here); NVIDIA_INDEX, NVIDIA's package index (default https://pypi.nvidia.com).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$PWD/gpu-check-$(date +%Y%m%d-%H%M%S)"
BUDGET=900
REUSE_VENV=0
SKIP=","
ONLY=""
ARCH=${GPU_CHECK_ARCH:-fashion-fine}
PRESET=${GPU_CHECK_PRESET:-tiny}
NVIDIA_INDEX=${NVIDIA_INDEX:-https://pypi.nvidia.com}

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --reuse-venv) REUSE_VENV=1; shift ;;
    --skip) SKIP=",$2,"; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
SUMMARY="$OUT/summary.tsv"
printf 'step\tkind\tstatus\tseconds\tdetail\n' > "$SUMMARY"
STEP_NO=0
FAILED=0
PY=python3

jetson() { [ -e /etc/nv_tegra_release ]; }

# Why a GPU step cannot run here (empty: it can). torch is asked only once a driver is there.
gpu_reason() {
  if ! command -v nvidia-smi >/dev/null 2>&1 && ! jetson; then
    echo "no NVIDIA driver on this machine (nvidia-smi not found, not a Jetson)"; return
  fi
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "torch in $("$PY" -c 'import sys; print(sys.prefix)' 2>/dev/null) sees no CUDA device (a CPU build of torch?)"
    return
  fi
}

# run_step NAME KIND LIMIT_SECONDS COMMAND: run COMMAND (a bash string) with the step's limit, log and summary row.
run_step() {
  local name=$1 kind=$2 limit=$3 cmd=$4
  STEP_NO=$((STEP_NO + 1))
  local log; log="$OUT/$(printf '%02d' "$STEP_NO")-$name.log"
  local status detail t0 rc remaining
  t0=$(date +%s)
  remaining=$((BUDGET - (t0 - START)))
  if [[ -n "$ONLY" && "$ONLY" != *",$name,"* ]] || [[ "$SKIP" == *",$name,"* ]]; then
    status=skipped; detail="not asked for (--skip/--only)"
    echo "$detail" > "$log"
  elif [ "$remaining" -le 5 ]; then
    status=FAILED; detail="not run: the ${BUDGET}s budget is spent"
    echo "$detail" > "$log"
  else
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    local why=""
    [ "$kind" = gpu ] && why=$(gpu_reason)
    if [ -n "$why" ]; then
      status=FAILED; detail="needs a CUDA GPU: $why"
      echo "$detail" > "$log"
    else
      echo "+ $cmd" > "$log"
      timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$log" 2>&1
      rc=$?
      if [ $rc -eq 0 ]; then
        status=ok; detail=""
      elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status=FAILED; detail="timed out after ${limit}s (see $(basename "$log"))"
      else
        status=FAILED; detail="exit $rc: $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-200)"
      fi
    fi
  fi
  [ "$status" = FAILED ] && FAILED=1
  local secs=$(($(date +%s) - t0))
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$status" "$secs" "${detail//$'\t'/ }" >> "$SUMMARY"
  printf '%-14s %-4s %-8s %5ss  %s\n' "$name" "$kind" "$status" "$secs" "$detail"
}

echo "gpu_check: results in $OUT (budget ${BUDGET}s)"
cd "$ROOT" || exit 2

run_step machine cpu 60 "date -u; uname -a; lscpu 2>/dev/null | head -30; nvidia-smi 2>&1 || true; \
  cat /etc/nv_tegra_release 2>/dev/null || true; python3 -V; git -C '$ROOT' log -1 --oneline 2>/dev/null || true"

# The venv: fresh (the point of a first run), unless --reuse-venv takes the active one (or the repo's .venv).
if [ "$REUSE_VENV" = 1 ]; then
  VENV=${VIRTUAL_ENV:-$ROOT/.venv}
  run_step venv cpu 30 "test -x '$VENV/bin/python' && \
    '$VENV/bin/python' -c 'import fine_infer, torch; print(torch.__version__)'"
else
  VENV="$OUT/venv"
  SITE=""
  jetson && SITE="--system-site-packages"  # JetPack's TensorRT and torch live in the system Python
  run_step venv cpu 420 "python3 -m venv $SITE '$VENV' && '$VENV/bin/pip' install -q -e '$ROOT[all]' \
    && '$VENV/bin/pip' freeze > '$OUT/pip-freeze.txt'"
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"

# TensorRT for this CUDA: real wheels from NVIDIA's index (PyPI's tensorrt* packages are stubs that download at install
# time); JetPack ships it in the system Python. Then record what the GPU stack is.
if jetson; then GPU_EXTRA=gpu; else
  CUDA_MAJOR=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9]*' | grep -o '[0-9]*$' || true)
  GPU_EXTRA="gpu-cu${CUDA_MAJOR:-12}"
fi
run_step gpu-deps gpu 300 "'$PY' -m pip install -q --extra-index-url '$NVIDIA_INDEX' -e '$ROOT[$GPU_EXTRA]' && \
  '$PY' -c 'import json, torch, triton, tensorrt; d = torch.cuda.get_device_properties(0); \
print(json.dumps({\"gpu\": d.name, \"cc\": f\"{d.major}.{d.minor}\", \"torch\": torch.__version__, \
\"cuda\": torch.version.cuda, \"triton\": triton.__version__, \"tensorrt\": tensorrt.__version__}))' \
  | tee '$OUT/versions.json'"

run_step aot-compile cpu 300 "'$PY' -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_compile.py \
  -k nvidia_targets --junitxml='$OUT/aot-compile.xml'"

# Compiled kernels and tuning choices are kept in the results folder (the warm-up restart test measures the reuse).
export TRITON_CACHE_DIR="$OUT/triton-cache"
run_step gpu-tests gpu 420 "'$PY' -m pytest -q -p no:cacheprovider -m gpu -rs tests/kernels tests/deploy tests/index \
  --junitxml='$OUT/gpu-tests.xml'"

run_step kernel-bench gpu 300 "'$PY' benchmarks/bench_kernels.py --json '$OUT/kernel-bench.json'"

BUNDLE="$OUT/bundle"
run_step export cpu 240 "'$PY' -m fine_infer.cli export --arch '$ARCH' --preset '$PRESET' --out '$BUNDLE' --fp16 \
  --lint --force --json > '$OUT/export.json'"

run_step engines gpu 300 "test -d '$BUNDLE' || { echo 'needs the export step'; exit 1; }; \
  '$PY' -m fine_infer.cli build-engine '$BUNDLE' --json > '$OUT/engines-fp32.json' && \
  '$PY' -m fine_infer.cli build-engine '$BUNDLE' --fp16 --json > '$OUT/engines-fp16.json'"

run_step bench gpu 240 "test -d '$BUNDLE' || { echo 'needs the export step'; exit 1; }; \
  '$PY' -m fine_infer.cli bench '$BUNDLE' --backend onnxruntime torch torch+kernels tensorrt --batch-sizes 1 8 32 \
  --quick --no-progress --json '$OUT/bench.json'"

TRT_FLAG=""
TRT_VERSION=${TRITON_TENSORRT_VERSION:-$("$PY" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)}
[ -n "$TRT_VERSION" ] && TRT_FLAG="--tensorrt-version $TRT_VERSION"
run_step triton-repo cpu 60 "test -d '$BUNDLE' || { echo 'needs the export step'; exit 1; }; \
  '$PY' -m fine_infer.cli triton-repo '$BUNDLE' --out '$OUT/triton-repo' --force --json $TRT_FLAG \
  > '$OUT/triton-repo.json'"

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "Total $(($(date +%s) - START)) s of a ${BUDGET} s budget; logs and results beside this file."
  echo
  echo "| step | kind | status | seconds | detail |"
  echo "|---|---|---|---|---|"
  tail -n +2 "$SUMMARY" | while IFS=$'\t' read -r s k st sec d; do echo "| $s | $k | $st | $sec | $d |"; done
} > "$OUT/summary.md"
echo "gpu_check: $([ $FAILED = 0 ] && echo 'every step passed' || echo 'some steps FAILED') — $OUT/summary.md"
exit $FAILED
