#!/usr/bin/env bash
# GPU check for salcompile: one script for a CUDA machine (torch >= 2.11 preinstalled, no internet).
#
#     bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT
#
# Stages (each under `timeout`, each logged to $OUT/<stage>.log; a failing stage does not stop the
# others; the whole script stays under ~7 minutes):
#   env        torch / CUDA / device facts, nvidia-smi
#   install    pip install --no-deps --no-build-isolation -e .
#   cuda_tests pytest tests/test_devices.py                  (fast = reference on CUDA fp32/bf16, compile)
#   step_time  python benchmarks/step_time.py --device cuda  -> $OUT/step_time_cuda.md
#   billion    python benchmarks/step_time.py --billion      -> $OUT/step_time_billion.md
#   paper_scale python benchmarks/step_time.py --paper-scale --device cuda
#                                                            -> $OUT/step_time_paper_scale_cuda.md
#   pytest     the fusion tests and the train-step graph tests under the device's torch and its
#              stock onnxruntime (the train-step graph is meant for any onnxruntime >= 1.19)
# $OUT/summary.md lists each stage's exit status and wall time (124 = hit its timeout).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
SUMMARY="$OUT/summary.md"
T_START=$(date +%s)
{
  echo "# gpu_check.sh summary"
  echo
  echo "| stage | exit | seconds | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

stage() {  # stage NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  local t0 rc t1
  t0=$(date +%s)
  echo "=== [$name] (timeout ${limit}s): $*" | tee -a "$OUT/all.log"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  tail -n 40 "$OUT/$name.log" >> "$OUT/all.log"
  echo "=== [$name] exit $rc after $((t1 - t0)) s" | tee -a "$OUT/all.log"
  echo "| $name | $rc | $((t1 - t0)) | $name.log |" >> "$SUMMARY"
  return 0
}

stage env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'; $PY -m pip list 2>/dev/null | grep -i -E '^(torch|networkx|numpy|pytest|hypothesis|scikit-learn|onnx|setuptools) '"
stage install 40 "$PY" -m pip install --no-deps --no-build-isolation -e .
# --budget: variants / rounds / extras not started after 75 s are reported as skipped, so the
# results file is written well inside the stage's timeout.
stage cuda_tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py
stage step_time 120 "$PY" benchmarks/step_time.py --device cuda --budget 75 --out "$OUT/step_time_cuda.md"
stage billion 60 "$PY" benchmarks/step_time.py --billion --steps 50 --out "$OUT/step_time_billion.md"
stage paper_scale 60 "$PY" benchmarks/step_time.py --paper-scale --device cuda --budget 35 --out "$OUT/step_time_paper_scale_cuda.md"
stage pytest 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_fuse_regions.py tests/test_train_step_export.py

echo "" >> "$SUMMARY"
echo "total: $(( $(date +%s) - T_START )) s" >> "$SUMMARY"
cat "$SUMMARY"
for f in "$OUT/step_time_cuda.md" "$OUT/step_time_billion.md" "$OUT/step_time_paper_scale_cuda.md"; do
  [ -f "$f" ] && { echo; cat "$f"; }
done
exit 0
