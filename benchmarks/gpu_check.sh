#!/usr/bin/env bash
# The GPU checks of issues 5, 6 and 18 as ONE call on a lent GPU machine (the `device` tool), prepared ahead: a
# session gets 15 minutes of device time, the machine's start included, and one call may run 10 minutes.
#
# Fits 8 minutes: each step has its own `timeout` and they add up to 470 s (machine 30, install 30, tests 130,
# speed 180, accuracy 100; the Fashion-MNIST export runs in the background meanwhile, inside its own 150 s).
# Prints each result as it comes (python -u, tee), so a step stopped by its limit loses nothing printed before;
# every step also writes its own file under $OUT: gpu.txt, tests.txt, bench.txt, datasets.txt, accuracy.txt and
# history.csv (6 files: the tool brings back at most 8).
#
# The machine runs its own python3 (torch 2.11, torchvision 0.26 when last seen, not our pins): vgg is installed
# there with `pip install --no-deps --no-build-isolation -e .` (nothing can be downloaded there; every runtime
# dependency but torch is pure Python or in its image; a missing one can travel as a wheel in .whl/, see
# /work/.library/device/README.md) and src/ stays on PYTHONPATH in case the install fails.
#
# Here, once:  echo /.idx/ >> .git/info/exclude && cp -r /usr/share/datasets/fashion-mnist .idx
# Then:        device run: command "bash benchmarks/gpu_check.sh", carry [".idx"], timeout_s 540
# Order: the correctness checks first (gpu-marked tests and the CPU-side checks of the same issues, under the
# machine's torch), then the speed rows, then a capped accuracy run (1,000 images per class, EPOCHS epochs).
set -uo pipefail
OUT=${OUT:-runs/gpu-check}
EPOCHS=${EPOCHS:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
began=$SECONDS
step() { printf '\n=== %s (at %d s; limit %d s)\n' "$1" $((SECONDS - began)) "$2"; }

step "machine" 30
{
    timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    timeout 25 python3 -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} 2>&1 | tee "$OUT/gpu.txt"

# In the background from here: the accuracy run at the end needs it, nothing before does.
if [ -d .idx ]; then
    (timeout 150 python3 -m vgg datasets fashion-mnist data/fashion-mnist --source .idx --limit-per-class 1000 \
        >"$OUT/datasets.txt" 2>&1; echo "exit $?" >>"$OUT/datasets.txt") &
    export_pid=$!
else
    echo "no .idx folder: the accuracy run is skipped (see the header for how to carry Fashion-MNIST)" | tee "$OUT/datasets.txt"
    export_pid=
fi

step "install" 30
{
    [ -d .whl ] && timeout 10 python3 -m pip install -q --no-index --no-deps .whl/*.whl
    timeout 20 python3 -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install failed: running from src/"
    python3 -c "import importlib.util as u; m = [n for n in ('safetensors', 'numpy', 'PIL', 'matplotlib', 'tqdm', 'pytest') if u.find_spec(n) is None]; print('missing:', m or 'none')"
} 2>&1 | tee -a "$OUT/gpu.txt"

step "tests: gpu-marked and the checks of issue 18" 130
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 90)
timeout 130 python3 -m pytest -q -rs -p no:cacheprovider "${per_test[@]}" tests/test_gpu_path.py tests/test_autobatch.py \
    tests/test_jpeg.py tests/test_runtime.py 2>&1 | tee "$OUT/tests.txt"

step "speed (bench_speed --quick)" 180
timeout 180 python3 -u benchmarks/bench_speed.py --quick --no-append 2>&1 | tee "$OUT/bench.txt"

step "accuracy (Fashion-MNIST, 1,000 images per class, $EPOCHS epochs)" 100
if [ -n "$export_pid" ]; then
    wait "$export_pid"
    tail -2 "$OUT/datasets.txt"
    timeout 100 python3 -u benchmarks/accuracy.py --arch vgg16_bn --epochs "$EPOCHS" --out runs/gpu-accuracy --no-append \
        -- --batch-size 256 2>&1 | tee "$OUT/accuracy.txt"
    cp runs/gpu-accuracy/history.csv "$OUT/" 2>/dev/null
fi

printf '\n=== summary (%d s)\n' $((SECONDS - began))
grep -h -E "NVIDIA|^python" "$OUT/gpu.txt"
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -1
grep -E "vgg train \((synthetic|jpeg folder)" "$OUT/bench.txt" | head -6
grep -iE "test accuracy|accuracy" "$OUT/accuracy.txt" 2>/dev/null | tail -2
exit 0
