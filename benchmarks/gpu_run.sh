#!/usr/bin/env bash
# One-shot GPU session: build the CUDA extension and the standalone harnesses, run the whole test
# suite on the GPU, then the benchmarks; everything lands in $OUT (default ./gpu_out).
#   bash benchmarks/gpu_run.sh [build] [profile] [test] [bench] [quick] [verify] [harness] [bench-FILE]
# Uses the machine's own python3/torch/triton (no installs).
#
# A lent GPU comes with 15 minutes of device time per session (machine start included), one
# command at most 10 minutes: `verify` is the phase sized for that (its first three steps ~9.5 minutes):
#   bash benchmarks/gpu_run.sh verify      (run with timeout_s=590)
# It builds the extension (<= 170 s); profiles the whole model (<= 330 s: kernel time per op family at
# 256 px batch 1 and 512 px batch 8, bf16, then reference eager, torch.compile(reference), the eager
# default and optimize(), in one run: benchmarks/profile_families.py); then runs the tests only a GPU
# can run (<= 90 s: real Triton and CUDA compilation, tensor-core precision, CUDA graphs; the CPU suite
# already checks every kernel's logic in the Triton interpreter and the CUDA emulation).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PHASES=${*:-build test bench}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "=== $(date +%T) $*"; }

env_report() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 - <<'PY'
import json, torch, triton, platform
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "gpu": torch.cuda.get_device_name(0), "python": platform.python_version()}
print(json.dumps(info))
PY
}

build() {
  log build extension
  MOCE_CUDA_ARCHS=90 MAX_JOBS=16 timeout ${BUILD_TIMEOUT:-600} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  local rc=$?
  tail -5 "$OUT/build.log"; grep -E "error|warning: .*spill" "$OUT/build.log" | head -40
  python3 -c "import moce_kernels, torch; print('backends:', moce_kernels.available_backends())"
  return $rc
}

harness() {
  log cmake harness build
  cmake -S . -B build/cmake -DCMAKE_CUDA_ARCHITECTURES=90 > "$OUT/cmake.log" 2>&1 &&
    cmake --build build/cmake -j 16 >> "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; return 1; }
  for h in build/cmake/*_harness; do log "$h"; timeout 60 "$h" 2>&1 | tail -8; done
}

tests() {
  log tests
  MOCE_FAIL_LOG="$OUT/failures.log" timeout ${TEST_TIMEOUT:-420} python3 -m pytest ${TEST_PATHS:-tests} -v \
    -n ${JOBS:-14} -p no:cacheprovider -k "${TEST_K:-not inductor_whole_model}" \
    --deselect tests/test_cuda_build.py::test_cmake_builds_kernels_for_sm80_and_sm90 > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; grep -cE " PASSED" "$OUT/tests.log"; grep -E " (FAILED|ERROR)" "$OUT/tests.log" | head -40
  tail -2 "$OUT/tests.log"
}

bench() {  # bench FILE [-k EXPR] [timeout]
  log "benchmarks $1 ${2:-}"
  timeout ${3:-${BENCH_TIMEOUT:-540}} python3 -m pytest benchmarks/$1 --benchmark-only -q -p no:cacheprovider \
    -k "${2:-}" --benchmark-json="$OUT/bench_${1%.py}.json" > "$OUT/bench_${1%.py}.log" 2>&1
  echo "rc=$?"; grep -E "passed|failed|error" "$OUT/bench_${1%.py}.log" | tail -3
}

bench_quick() {  # the headline cases of every suite, within a few minutes
  bench bench_model.py "MoCE_IR- and (256px or 512px-b1) or cuda_graph" 150
  bench bench_window_attention.py "forward and B8 and (C48_128x128 or C192_128x128 or C6_512x512 or C24_512x512) and not compile" 60
  bench bench_expert_conv.py "bfloat16 and ((B8_128x128 and (qkv or gdfn or xkv)) or C96_128x128) and not compile" 60
  bench bench_routing.py "overhead and bfloat16 and cuda" 150  # 24 cases; the Triton expert stage JITs per shape
}

gpu_tests() {  # the GPU-only checks, bounded: build must have run
  log gpu tests
  MOCE_FAIL_LOG="$OUT/failures.log" timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -n ${JOBS:-12} \
    -p no:cacheprovider -m gpu -k "${TEST_K:-not inductor_whole_model}" \
    tests/test_window_attention_backends.py tests/test_expert_conv_backends.py tests/test_experts_backends.py \
    tests/test_routing_backends.py tests/test_compile_graph.py tests/test_model_backends.py \
    tests/test_channel_attention.py tests/test_norm_conv.py tests/test_optimize.py > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -30
}

profile() {  # kernel time per op family, then the whole model four ways (benchmarks/profile_families.py)
  log profile
  timeout ${PROFILE_TIMEOUT:-330} python3 benchmarks/profile_families.py --out "$OUT" --budget-s ${PROFILE_BUDGET:-270} \
    > "$OUT/profile.log" 2>&1
  echo "profile rc=$?"; cat "$OUT/profile.md" 2>/dev/null || tail -20 "$OUT/profile.log"
}

verify() {  # build (<= 170 s), profile (<= 330 s), GPU-only tests (<= 90 s), then the older headline
  # benchmarks of the mission ops while time remains (the run's 10-minute limit may cut them; what is
  # in $OUT by then comes back, the profile first)
  BUILD_TIMEOUT=170 build || { echo "build failed"; return 1; }
  profile
  TEST_TIMEOUT=90 gpu_tests
  bench bench_window_attention.py "forward and B8 and (C6_512x512 or C48_128x128 or C24_512x512 or C192_128x128) and not compile" 50
  bench bench_expert_conv.py "bfloat16 and not compile and ((B8_128x128 and (qkv or gdfn or xkv)) or (C96_128x128 and not forward_backward) or (widths and cuda))" 75
  python3 benchmarks/summarize.py "$OUT" | tee "$OUT/summary.md"
}

env_report 2>&1 | tee "$OUT/env.txt"
for phase in $PHASES; do
  case $phase in
    build) build ;;
    profile) profile ;;
    harness) harness ;;
    test) tests ;;
    bench) for b in bench_window_attention.py bench_expert_conv.py bench_routing.py bench_model.py; do bench $b; done ;;
    quick) bench_quick ;;
    verify) verify ;;
    bench-*) bench "${phase#bench-}" ;;
  esac
done
log done
