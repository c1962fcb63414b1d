#!/usr/bin/env bash
# GPU acceptance in one call: install (offline-safe), the GPU tests, the measurements; one JSON and one log.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--data-dir DIR] [--out DIR] [--device cuda|cpu] [--quick]
#                                [--python PY] [--budget-s S]
#
# Uses the machine's own python3 and torch (never replaces them): the project goes in with --no-deps (or on
# PYTHONPATH), and a missing package is installed from --wheels with --no-index. --data-dir may hold MNIST/raw
# as .gz files only: they are unpacked into a temporary root. Writes gpu_check.json (top-level "ok") and
# gpu_check.log to --out. Exit 0 ok, 1 a check failed, 2 the environment is missing something.
# --device cpu --quick is a CPU smoke run of this script's plumbing (tiny runs; the GPU tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3} WHEELS="" DATA="" OUT="benchmarks/results/gpu" DEVICE=cuda QUICK="" BUDGET=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --data-dir) DATA=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --budget-s) BUDGET=$2; shift 2 ;;
        --quick) QUICK=--quick; shift ;;
        *) echo "error: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
STARTED=$(date +%s)
export PYTHONUNBUFFERED=1  # the log keeps the order in which things happened
# 10 minutes on one H100 with a margin; pytest gets at most PYTEST_S of it, the measurements the rest
if [ -n "$QUICK" ]; then BUDGET=${BUDGET:-170} PYTEST_S=60; else BUDGET=${BUDGET:-560} PYTEST_S=400; fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
rm -f "$OUT/gpu_check.json"
exec > >(tee "$LOG") 2>&1
TEE=$!
TMP=$(mktemp -d)
finish() {  # remove the unpacked data; let tee write the log's last lines before the script returns
    rm -rf "$TMP"
    exec >&- 2>&-
    wait "$TEE" 2>/dev/null
}
trap finish EXIT
report_failure() {  # $1: one line; the JSON says it too, for whoever reads only the JSON
    printf '{"ok": false, "problems": ["%s"]}\n' "${1//\"/\'}" > "$OUT/gpu_check.json"
}
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname): device $DEVICE${QUICK:+, quick}, budget ${BUDGET} s"

echo "== install"
INSTALL="editable"
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" > "$TMP/pip.log" 2>&1; then
    # an old setuptools, no wheel package, a read-only site-packages: the source tree on the path does as well
    INSTALL="PYTHONPATH"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    echo "editable install failed ($(grep -iE '^ *error: ' "$TMP/pip.log" | grep -v exited-with-error | head -1 | sed 's/^ *//')): using PYTHONPATH=$ROOT"
fi
FROM_WHEELS=""
for pair in zmq:pyzmq msgpack:msgpack tqdm:tqdm matplotlib:matplotlib pytest:pytest pytest_timeout:pytest-timeout \
            torchvision:torchvision; do
    module=${pair%%:*} package=${pair#*:}
    "$PY" -c "import $module" 2>/dev/null && continue
    if [ -n "$WHEELS" ]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$package" && FROM_WHEELS="$FROM_WHEELS $package"
    fi
    if ! "$PY" -c "import $module" 2>/dev/null; then
        echo "error: python package $package (import $module) is missing and not in --wheels ${WHEELS:-(none given)}: add its wheel there" >&2
        report_failure "python package $package is missing (install it, or add its wheel to --wheels)"
        exit 2
    fi
done
INSTALL="$INSTALL; from wheels:${FROM_WHEELS:- none}"
echo "install: $INSTALL"
"$PY" - <<'EOF'
import platform, torch, torchvision, zmq
print(f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else None}, torchvision {torchvision.__version__}, pyzmq {zmq.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv

DATA_ROOT=""
if [ -n "$DATA" ]; then
    if [ -f "$DATA/MNIST/raw/train-images-idx3-ubyte" ]; then
        DATA_ROOT=$DATA
    elif ls "$DATA"/MNIST/raw/*-ubyte.gz >/dev/null 2>&1; then
        # torchvision reads only the unpacked files
        mkdir -p "$TMP/data/MNIST/raw"
        for f in "$DATA"/MNIST/raw/*-ubyte.gz; do gunzip -c "$f" > "$TMP/data/MNIST/raw/$(basename "${f%.gz}")"; done
        DATA_ROOT="$TMP/data"
        echo "data: unpacked $(ls "$TMP/data/MNIST/raw" | wc -l) MNIST files from $DATA"
    else
        echo "data: no MNIST/raw under $DATA: the MLP runs use synthetic MNIST-shaped data"
    fi
fi

echo "== GPU tests (pytest -m cuda tests/gpu, at most ${PYTEST_S} s)"
(
    WORKERS=()
    if [ "$DEVICE" = cpu ]; then
        export CUDA_VISIBLE_DEVICES=  # the tests skip, as they do on a machine without a GPU
    elif "$PY" -c "import xdist" 2>/dev/null; then
        WORKERS=(-n 4)  # pytest-xdist: four runs share the GPU at a time (each is mostly process start-up)
    fi
    # SIGINT first, so that pytest still writes its report when the time is up
    exec timeout -s INT -k 20 "$PYTEST_S" "$PY" -m pytest -m cuda tests/gpu -p no:cacheprovider -q -rA \
        ${WORKERS[@]+"${WORKERS[@]}"} --timeout 150 --junitxml "$TMP/gpu_tests.xml"
)
PYTEST_RC=$?
echo "pytest exit $PYTEST_RC"

echo "== measurements (benchmarks/gpu_check.py)"
"$PY" benchmarks/gpu_check.py --out "$OUT" --device "$DEVICE" $QUICK ${DATA_ROOT:+--data-dir "$DATA_ROOT"} \
    --junit "$TMP/gpu_tests.xml" --pytest-rc "$PYTEST_RC" --deadline $((STARTED + BUDGET)) --install "$INSTALL"
RC=$?
if [ ! -f "$OUT/gpu_check.json" ]; then
    # the measurements died before writing: still leave one JSON that says so
    report_failure "benchmarks/gpu_check.py exited $RC without a report (pytest exited $PYTEST_RC): see gpu_check.log"
    [ "$RC" = 2 ] || RC=1
fi
echo "== done in $(($(date +%s) - STARTED)) s: $OUT/gpu_check.json (exit $RC)"
exit $RC
