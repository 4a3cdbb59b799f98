#!/usr/bin/env bash
# The GPU checks that issues 5 and 6 name, as one call on a lent GPU machine (the `device` tool), prepared ahead
# because a session gets 15 minutes of device time, the machine's start included. There, python3 is the machine's
# own (with its torch), the package runs from src/ and Fashion-MNIST comes from IDX files carried in .idx/ (nothing
# can be downloaded there).
#
# Here, once:  echo /.idx/ >> .git/info/exclude && cp -r /usr/share/datasets/fashion-mnist .idx
# Then:        device run: command "bash benchmarks/gpu_check.sh", carry [".idx"], timeout_s 560
# Results come back under $OUT (gpu.txt, tests.txt, bench.txt, accuracy.txt, history.csv, confusion.csv); each step
# writes its own file, so a step that fails or runs out of time does not lose the others.
# EPOCHS (default 30) and ACCURACY_SECONDS (default 300) size the accuracy run.
set -uo pipefail
OUT=${OUT:-runs/gpu-check}
EPOCHS=${EPOCHS:-30}
ACCURACY_SECONDS=${ACCURACY_SECONDS:-300}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/benchmarks" PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    python3 -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/gpu.txt"

python3 -m vgg datasets fashion-mnist data/fashion-mnist --source .idx >"$OUT/datasets.txt" 2>&1 || {
    tail -5 "$OUT/datasets.txt"
    exit 1
}

# The tests that run only on CUDA, then the ones around the GPU decoder and layouts.
timeout 120 python3 -m pytest -q -rs tests/test_autobatch.py tests/test_jpeg.py tests/test_runtime.py tests/test_predict.py \
    >"$OUT/tests.txt" 2>&1
tail -3 "$OUT/tests.txt"

timeout 150 python3 benchmarks/bench_speed.py --quick --no-append >"$OUT/bench.txt" 2>&1
tail -25 "$OUT/bench.txt"

timeout "$ACCURACY_SECONDS" python3 benchmarks/accuracy.py --arch vgg16_bn --epochs "$EPOCHS" --out runs/gpu-accuracy \
    --no-append -- --batch-size 256 >"$OUT/accuracy.txt" 2>&1
cp runs/gpu-accuracy/history.csv runs/gpu-accuracy/confusion.csv "$OUT/" 2>/dev/null
tail -12 "$OUT/accuracy.txt"
