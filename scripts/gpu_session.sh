#!/usr/bin/env bash
# The GPU measurements BENCHMARKS.md still lacks.
#
# Here (a machine with network, before the device call):
#   bash scripts/gpu_session.sh prepare   # fills .whl/ with the wheels the device lacks (for its Python, 3.12;
#                                         # WHEEL_PYTHON=3.x for another) and packs cifar10/train from ../shared into
#                                         # .gpu_data/cifar10_train.tar.gz; both git-ignored, both carried with the call
#
# On the device machine, the whole session in one call of at most 9 minutes (scripts/gpu_session.py; each stage has
# its own time limit; a failed stage is reported and the next one runs):
#   bash scripts/gpu_session.sh all       # bench_gpu.py eager at batch 8 and 32, the NMS table, SimCLR detkit vs
#                                         # lightly, bench_gpu.py compiled (CUDA graphs) at batch 8, make test-gpu,
#                                         # compiled at batch 32; prints one markdown block for BENCHMARKS.md, also
#                                         # $OUT/BENCHMARKS_block.md (+ results.json, logs.tar.gz, device.txt)
#   bash scripts/gpu_session.sh all --dry-run   # (or DRY_RUN=1) every stage on tiny CPU inputs, no install
#                                               # (tests/scripts/test_gpu_session.py, in the default suite)
#   bash scripts/gpu_session.sh all --stages compiled-32 --budget 240   # a second, shorter call (any stages)
#
# Single stages, one device call each (each well inside 10 minutes):
#   bash scripts/gpu_session.sh compile [PRECISION]  # issue 16: compiled step as CUDA graphs, batch 8, Faster
#                                                    # R-CNN and YOLO (default 16-mixed; bf16-mixed has no scaler)
#   bash scripts/gpu_session.sh eager     # issue 16: eager re-measure after the sync fixes, with torchvision
#   bash scripts/gpu_session.sh tests     # tests/test_cuda.py: the device path checked on the GPU (make test-gpu)
#   bash scripts/gpu_session.sh views     # issue 17: SimCLR views on the device (BCCD images when ../shared is absent)
#   bash scripts/gpu_session.sh parity    # issue 28: SimCLR detkit vs lightly, 10,000 CIFAR-10 images, 40 epochs,
#                                         # batch 512, probed (needs .gpu_data/cifar10_{train,test}.tar.gz)
#   bash scripts/gpu_session.sh study     # issues 29/32: the whole pretraining and self-training study on BCCD
#                                         # (detkit-study --preset gpu: 2 pretrainings, then 80 fine-tunings side by
#                                         # side through Hydra's joblib launcher, from .whl); ends within 8 minutes
#                                         # (--budget-s), the report from what completed: $OUT/study/study.md
#
# Run from the repository root; on the device machine with .whl (and .gpu_data) carried; each stage writes its
# markdown and log under $OUT (default /tmp/gpu_out). PYTHON picks the interpreter (default python3).
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
STAGE=${1:-}
[ $# -gt 0 ] && shift
DRY=${DRY_RUN:-0}
for a in "$@"; do [ "$a" = --dry-run ] && DRY=1; done

# The distributions the device's image lacks (hydra-core's antlr4 runtime has no wheel: built by `pip wheel`), and
# what they need beyond the image (scripts/gpu_session.py --check-wheels checks that against the image's list).
WHEELS="hydra-core omegaconf albumentations albucore stringzilla simsimd pydantic pydantic-core annotated-types
typing-inspection typing-extensions pycocotools faster-coco-eval torchdata lightly hydra-joblib-launcher"

prepare() {
    set -e
    local vpy=${PREP_PYTHON:-.venv/bin/python} pyv=${WHEEL_PYTHON:-3.12} tmp specs=() v name w
    [ -x "$vpy" ] || vpy=$PY
    tmp=$(mktemp -d)
    # the versions of this checkout's .venv (the ones the tests pass with), else the newest
    for name in $WHEELS; do
        if v=$("$vpy" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null); then
            specs+=("$name==$v")
        else
            specs+=("$name")
        fi
    done
    echo "prepare: wheels for CPython $pyv, x86-64 Linux: ${specs[*]} antlr4-python3-runtime==4.9.3"
    "$vpy" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$tmp" "${specs[@]}"
    "$vpy" -m pip wheel -q --no-deps -w "$tmp" antlr4-python3-runtime==4.9.3
    mkdir -p .whl
    for w in "$tmp"/*.whl; do  # one version of each distribution in .whl/ (two stop the install there)
        name=$(basename "$w" | cut -d- -f1)
        find .whl -maxdepth 1 -iname "${name}-*.whl" ! -name "$(basename "$w")" -delete
        mv -f "$w" .whl/
    done
    rm -rf "$tmp"
    WHEEL_PYTHON=$pyv "$vpy" scripts/gpu_session.py --check-wheels .whl
    local cifar=${CIFAR_DIR:-../shared/datasets/cifar10}
    mkdir -p .gpu_data
    if [ -d "$cifar/train" ]; then
        tar -czf .gpu_data/cifar10_train.tar.gz -C "$(dirname "$cifar")" "$(basename "$cifar")/train"
        # the probe's query split, for the parity stage
        tar -czf .gpu_data/cifar10_test.tar.gz -C "$(dirname "$cifar")" "$(basename "$cifar")/test"
    else
        echo "prepare: no $cifar/train: the SimCLR stage will use the BCCD images instead" >&2
    fi
    for d in .whl .gpu_data; do
        git check-ignore -q "$d" || { echo "prepare: $d is not git-ignored" >&2; return 1; }
    done
    local tree carried
    tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
    carried=$((tree + $(du -sb .whl | cut -f1) + $(du -sb .gpu_data | cut -f1)))
    du -sb .whl .gpu_data
    echo "prepare: working tree $((tree / 1048576)) MiB + .whl + .gpu_data = $((carried / 1048576)) MiB" \
        "(a call carries at most 64 MiB)"
}

setup() {  # the device machine: the missing packages from .whl/, then detkit itself (editable, no dependencies)
    if ! "$PY" -c "import hydra, omegaconf, albumentations, pycocotools, faster_coco_eval, torchdata, lightly" \
            2>/dev/null; then
        if ! ls .whl/*.whl > /dev/null 2>&1; then
            echo "no wheels in .whl/: run 'bash scripts/gpu_session.sh prepare' first and carry .whl" >&2
            return 1
        fi
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
}

device_txt() {
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt"
    "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
        >> "$OUT/device.txt"
}

case "$STAGE" in
prepare)
    prepare ;;
all)  # further arguments go to scripts/gpu_session.py (--stages, --limits, --budget)
    if [ "$DRY" = 1 ]; then
        set -- --dry-run "$@"
    else
        setup || { echo "gpu_session: set-up failed (wheels in .whl/ for this Python? see above)" >&2; exit 1; }
    fi
    exec "$PY" scripts/gpu_session.py --out "$OUT" --started-at "$START" "$@" ;;
compile)
    setup || exit 1; device_txt
    timeout 540 "$PY" scripts/bench_gpu.py --impls detkit,yolo --precisions "${1:-16-mixed}" --batches 8 \
        --compile --compile-mode reduce-overhead --skip-nms > "$OUT/compile.md" 2> "$OUT/compile.log" ;;
eager)
    setup || exit 1; device_txt
    timeout 540 "$PY" scripts/bench_gpu.py --batches 8 --precisions 32-true,16-mixed \
        > "$OUT/eager.md" 2> "$OUT/eager.log" ;;
tests)
    setup || exit 1; device_txt
    timeout 540 "$PY" -m pytest -q -m gpu tests/test_cuda.py -p no:cacheprovider > "$OUT/tests.log" 2>&1 ;;
views)
    setup || exit 1; device_txt
    timeout 540 "$PY" scripts/bench_simclr_views.py --batch 512 > "$OUT/views.md" 2> "$OUT/views.log" ;;
parity)  # issue 28's GPU goal: detkit (device views) vs lightly, 10,000 CIFAR-10 images, 40 epochs, batch 512,
         # both probed on cifar10/train -> cifar10/test (kNN k=20/k=1, linear); its own call (~8 min)
    setup || exit 1; device_txt
    mkdir -p /tmp/parity_cifar
    for split in train test; do
        tar -xzf ".gpu_data/cifar10_$split.tar.gz" -C /tmp/parity_cifar || exit 1
    done
    timeout 560 "$PY" scripts/bench_simclr_peer.py --cifar /tmp/parity_cifar/cifar10 --per-class 1000 --epochs 40 \
        --batch-size 512 --probe-per-class 1000 --augment-on device --device cuda --precision bf16-mixed \
        --workers 12 --out "$OUT/parity" > "$OUT/parity.md" 2> "$OUT/parity.log" ;;
study)  # issue 29 item 4 + issue 32 item 4, the full study in this one call of at most 8 minutes (480 s from START):
        # detkit-study --preset gpu, its jobs side by side on the GPU through Hydra's joblib launcher; the study stops
        # what still runs at its budget and reports what completed. Run in /tmp (checkpoints and logs stay there);
        # $OUT gets the report, the sweeps' tables, each job's metrics and logs (study_runs.tar.gz) and study.log.
    setup || exit 1; device_txt
    if ! "$PY" -c "import hydra_plugins.hydra_joblib_launcher" 2>/dev/null; then  # the image had hydra already
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            .whl/hydra_joblib_launcher-*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"  # detkit-train, -pretrain
    left=$((465 - ($(date +%s) - START)))  # 15 s kept for packing the results
    timeout "$((left + 10))" "$PY" -m detkit.cli.study --preset gpu --out /tmp/study --budget-s "$left" \
        > "$OUT/study.log" 2>&1
    rc=$?
    mkdir -p "$OUT/study"
    cp /tmp/study/study.* /tmp/study/*.png "$OUT/study/" 2>/dev/null
    (cd /tmp/study && find . \( -name summary.csv -o -name metrics.json -o -name run.json -o -name job_status.json \
        -o -name '*.log' -o -name metrics.csv -o -name 'pretrain_metrics.json' -o -name 'config.yaml' \
        -o -name multirun.yaml -o -name '*.json' -path './unlabeled/*' \) -print0 | tar -czf "$OUT/study_runs.tar.gz" --null -T -)
    tail -n 60 "$OUT/study.log"
    exit $rc ;;
*)
    echo "usage: bash scripts/gpu_session.sh prepare | all [--dry-run] | compile [PRECISION] | eager | tests" \
        "| views | parity | study" >&2
    exit 2 ;;
esac
