#!/usr/bin/env bash
# The GPU checks as one command, for a GPU machine that reaches no package registry: installs
# the wheels in .whl/, then runs the GPU suite (tests/gpu) and the throughput benchmark
# (bench/gpu_throughput.py), each part under its own timeout, and writes everything under $OUT.
#
#   bash bench/gpu_check.sh                          # parts "suite bench": the default, at most 330 + 240 s
#   bash bench/gpu_check.sh suite-full bench-options # any parts, in the order given
#   bash bench/gpu_check.sh --prepare                # beforehand, where PyPI answers: pytest's wheels into .whl/
#
# Parts (timeouts in seconds, override with the variable named):
#   suite          python -m pytest tests/gpu -m gpu: fast (the tiny pipeline without its evaluations)  SUITE_TIMEOUT=330
#   suite-full     the same with DOMAINFORGE_GPU_SUITE=full (the whole tiny pipeline, ~7 min of it)    SUITE_TIMEOUT=570
#   bench          gpu_throughput.py, default size (1.04 B, seq 2048, batch 8): plain,project,project+zero2  BENCH_TIMEOUT=240
#   bench-options  the same size: plain+gc,project+gc,project+liger,project+compile                         BENCH_TIMEOUT=240
#   BENCH_ARGS    more gpu_throughput.py flags for both bench parts, e.g. "--steps 20 --hidden 4096 --ffn 14336"
# The durations are estimates from a deepspeed start-up of 30-45 s on an H200, not measurements.
#
# .whl/ holds Python 3.12 wheels of what the machine lacks (deepspeed, trl, datasets, hydra,
# lm-eval, a newer transformers, ...: the session's make_wheels.sh builds them) and of pytest
# (--prepare adds those). Out: $OUT (default ./gpu-check-out): versions.txt, nvidia-smi.txt,
# <part>.txt (the console), suite.xml (junit), suite-logs/ (every run's output), bench.json,
# bench-logs/.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}  # where the wheels are installed

if [ "${1:-}" = "--prepare" ]; then
    # pytest and what it imports, at this environment's versions, as pure-Python wheels
    pins=$($PYTHON -m pip list --format=freeze 2>/dev/null | grep -iE "^(pytest|pluggy|iniconfig|packaging|pygments)==")
    mkdir -p .whl && $PYTHON -m pip download -q --no-deps --only-binary=:all: -d .whl $pins && ls .whl | grep -iE "pytest|pluggy|iniconfig|packaging|pygments"
    exit
fi

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(suite bench)
for part in "${PARTS[@]}"; do
    case $part in suite|suite-full|bench|bench-options) ;; *) echo "error: unknown part '$part' (suite, suite-full, bench, bench-options)" >&2; exit 2 ;; esac
done

# Wheels: installed once per machine into $SITE (a warm machine keeps it).
if ls .whl/*.whl >/dev/null 2>&1; then
    stamp=$SITE/.installed-$(ls .whl | md5sum | cut -c1-12)
    if [ ! -e "$stamp" ]; then
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl && touch "$stamp"
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
fi
missing=$($PYTHON - <<'PY'
import importlib.util
print(" ".join(m for m in ("torch", "deepspeed", "trl", "datasets", "hydra", "lm_eval", "peft", "accelerate", "pytest")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "error: not importable: $missing. Put their wheels in .whl/ (make_wheels.sh; pytest: bash bench/gpu_check.sh --prepare)" >&2
    exit 2
fi
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
{ git log -1 --format="commit %H %s" 2>/dev/null; $PYTHON -m pip list 2>/dev/null; $PYTHON -m pip list --path "$SITE" 2>/dev/null; } > "$OUT/versions.txt"

failed=()
run_part() {  # name, timeout, command...: the console to $OUT/<name>.txt; a timeout ends the whole tree
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (timeout ${limit}s): $*"
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local code=${PIPESTATUS[0]}
    echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
    [ "$code" -eq 0 ] || failed+=("$name (exit $code)")
}

suite() {
    run_part "$1" "${SUITE_TIMEOUT:-$3}" env DOMAINFORGE_GPU_SUITE="$2" DOMAINFORGE_GPU_LOGS="$OUT/suite-logs" \
        $PYTHON -m pytest tests/gpu -m gpu -v -rA -p no:cacheprovider --junitxml="$OUT/$1.xml"
}
bench() {
    run_part "$1" "${BENCH_TIMEOUT:-240}" $PYTHON -m bench.gpu_throughput --rows "$2" --json "$OUT/$1.json" \
        --logs "$OUT/$1-logs" ${BENCH_ARGS:-}
}
for part in "${PARTS[@]}"; do
    case $part in
        suite) suite suite fast 330 ;;
        suite-full) suite suite-full full 570 ;;
        bench) bench bench plain,project,project+zero2 ;;
        bench-options) bench bench-options plain+gc,project+gc,project+liger,project+compile ;;
    esac
done

echo "results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
