"""Serving speed: backends on this CPU, and `vgg serve` under concurrent clients against `vgg predict` in a loop.

    python benchmarks/bench_serve.py                 # both parts, a small model (vgg11, 32 px): a minute or two
    python benchmarks/bench_serve.py --part backends --arch vgg16 --image-size 224

Part ``backends``: images/s of one model call at batch 1, 8 and 32, for PyTorch as ``vgg predict`` runs it (bf16
where the CPU has native bf16, else fp32), PyTorch in fp32, and onnxruntime (fp32) on the ONNX export, each with
all cores and with one thread (on a shared machine, threads that wait for each other are what suffers).
Part ``serve``: N client threads over loopback, each sending one image per request on a kept-alive connection;
requests/s and p50/p99 latency with micro-batching (``--max-batch 32 --max-wait-ms 5``) and without
(``--max-batch 1``), for each backend; baseline: ``vgg predict MODEL IMAGE`` run again and again (a process each).
Prints Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vgg.checkpoint import ModelInfo, save_model
from vgg.export import export, onnx_session
from vgg.models import build
from vgg.predict import load


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as handle:
        text = handle.read()
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    flags = " ".join(sorted({f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in text}))
    load = os.getloadavg()[0]
    return f"{model}, {os.cpu_count()} cores ({flags}), load average {load:.1f}, torch {torch.__version__}"


def make_model(folder: Path, arch: str, size: int, classes: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    path = folder / "model.safetensors"
    info = ModelInfo(arch, [f"class{i}" for i in range(classes)], size, [0.5] * 3, [0.25] * 3)
    save_model(path, build(arch, num_classes=classes, image_size=size), info)
    image = folder / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image)
    return path, image


def _one_thread(fn):
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    return run


def part_backends(model: Path, size: int, repeats: int) -> list[str]:
    """Images/s per backend and batch size; the backends take turns call by call, so load changes hit all alike."""
    onnx_path = export(model, "onnx", out=model.with_suffix(".onnx")).path
    session, session_1t = onnx_session(onnx_path), onnx_session(onnx_path, threads=1)
    auto = load(model, device="cpu")
    fp32 = load(model, device="cpu", precision="fp32")
    rows = []
    for batch in (1, 8, 32):
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        floats = images.float().div(255).numpy()
        runs = {
            f"torch {auto.step.precision} (vgg predict)": lambda images=images: auto.probabilities(images),
            "torch fp32": lambda images=images: fp32.probabilities(images),
            "torch fp32, 1 thread": _one_thread(lambda images=images: fp32.probabilities(images)),
            "onnxruntime": lambda floats=floats: session.run(None, {"image": floats}),
            "onnxruntime, 1 thread": lambda floats=floats: session_1t.run(None, {"image": floats}),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for run in runs.values():
            run()  # warm-up: first calls allocate and pick kernels
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        cells = [f"{batch / statistics.median(t):,.1f}" for t in times.values()]
        rows.append(f"| {batch} | " + " | ".join(cells) + " |")
    header = "| batch | " + " | ".join(runs) + " |\n|---|" + "---|" * len(runs)
    return [header, *rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, backend: str, max_batch: int) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    args = ["--port", str(port), "--backend", backend, "--max-batch", str(max_batch), "--rate-limit", "0"]
    # The onnxruntime backend keeps its ONNX export in VGG_CACHE_DIR: the temp folder, not the user's ~/.cache.
    env = {**os.environ, "VGG_CACHE_DIR": str(model.parent / "cache")}
    command = [sys.executable, "-m", "vgg", "serve", str(model), *args]
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def client(port: int, body: bytes, requests: int) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        latencies.append(time.perf_counter() - start)
    return latencies


def load_test(port: int, body: bytes, clients: int, requests: int) -> tuple[float, float, float]:
    client(port, body, 3)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: client(port, body, requests), range(clients)))
    elapsed = time.perf_counter() - start
    latencies = np.array([x for r in results for x in r]) * 1000
    return len(latencies) / elapsed, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def part_serve(model: Path, image: Path, clients: int, requests: int, baseline_runs: int) -> list[str]:
    body = image.read_bytes()
    rows = ["| how | clients | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    times = []
    for _ in range(baseline_runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "vgg", "predict", str(model), str(image)], check=True, capture_output=True
        )
        times.append((time.perf_counter() - start) * 1000)
    rows.append(
        f"| `vgg predict` in a loop | 1 | {1000 / statistics.mean(times):.2f} | {statistics.median(times):.0f} "
        f"| {max(times):.0f} (max of {baseline_runs}) |"
    )
    for backend in ("torch", "onnxruntime"):
        for max_batch in (32, 1):
            proc, port = start_server(model, backend, max_batch)
            try:
                rate, p50, p99 = load_test(port, body, clients, requests)
            finally:
                proc.terminate()
                proc.wait(30)
            how = f"serve, {backend}, " + ("micro-batching (max 32, 5 ms)" if max_batch > 1 else "no batching")
            rows.append(f"| {how} | {clients} | {rate:.0f} | {p50:.1f} | {p99:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "backends", "serve"], default="all")
    parser.add_argument("--arch", default="vgg11")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--repeats", type=int, default=10, help="timed model calls per backend and batch size")
    parser.add_argument("--baseline-runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{datetime.date.today()}, {machine()}, Python {platform.python_version()}")
    print(f"command: python benchmarks/bench_serve.py {' '.join(sys.argv[1:])}".rstrip())
    with tempfile.TemporaryDirectory() as folder:
        model, image = make_model(Path(folder), args.arch, args.image_size, args.classes)
        print(f"model: {args.arch}, {args.image_size} px, {args.classes} classes\n")
        if args.part in ("all", "backends"):
            print("images/s of one model call (median of", args.repeats, "calls, backends taking turns):\n")
            print("\n".join(part_backends(model, args.image_size, args.repeats)) + "\n")
        if args.part in ("all", "serve"):
            rows = part_serve(model, image, args.clients, args.requests, args.baseline_runs)
            print("\n".join(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
