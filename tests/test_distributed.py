"""Several processes: torchrun with gloo on CPU, and the disjoint shards each process trains on."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, write_images

from vgg.batches import Batches
from vgg.inference import Step, evaluate
from vgg.models import build
from vgg.scan import scan_folder


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_each_process_gets_a_disjoint_shard_of_the_same_shuffled_order(two_class_dir: Path, cache: str):
    samples = scan_folder(two_class_dir).samples  # 24 images, each with its own noise

    def shard(rank: int, world: int, drop_last: bool) -> list[list[bytes]]:
        batches = Batches(
            samples, 8, 3, True, seed=5, workers=0, cache=cache, drop_last=drop_last, rank=rank, world_size=world
        )
        return [[image.numpy().tobytes() for image in images] for images, _ in batches]

    for world, drop_last in ((2, True), (3, False), (5, True)):
        shards = [shard(rank, world, drop_last) for rank in range(world)]
        everything = [image for batches in shards for batch in batches for image in batch]
        assert len(everything) == len(set(everything))  # disjoint
        if not drop_last:
            assert len(everything) == len(samples)  # and covering, as validation needs
        assert len({len(batches) for batches in shards}) == 1  # every process takes the same number of steps


def _torchrun(*args: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """``vgg train`` in two processes on the CPU (gloo), and the environment it ran in."""
    torchrun = Path(sys.executable).with_name("torchrun")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [
        str(torchrun if torchrun.exists() else "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "vgg", "train",
        *args, "--arch", "vgg11", "--image-size", "32", "--workers", "0", "--device", "cpu", "--precision", "fp32",
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300), env


needs_torchrun = pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)


@needs_torchrun
def test_torchrun_two_processes_on_cpu_trains_a_model_that_predicts(two_class_dir: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    done, env = _torchrun(str(two_class_dir), "--out", str(out), "--epochs", "2", "--batch-size", "4")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 processes" in done.stdout
    assert done.stdout.count("epoch 1/2:") == 1 and done.stdout.count("run folder:") == 1  # rank 0 alone speaks
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    predicted = subprocess.run(
        [sys.executable, "-m", "vgg", "predict", str(out / "best.safetensors"), str(two_class_dir / "dog")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert len(predicted.stdout.splitlines()) == 12


@needs_torchrun
def test_under_torchrun_a_diverging_run_stops_every_process_mid_epoch(tmp_path: Path):
    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=60)
    out = tmp_path / "ddp"
    # 96 training images, 2 a batch in each of 2 processes: 24 steps an epoch, so the check at step 20 comes first.
    done, _ = _torchrun(str(data), "--out", str(out), "--epochs", "1", "--batch-size", "2", "--lr", "1e30")
    assert done.returncode != 0
    assert "Training diverged in epoch 1: the training loss by batch 20 became nan" in done.stderr, done.stderr[-2000:]
    assert not (out / "best.safetensors").exists()


def _evaluate_on_shard(rank: int, world: int, port: int, data: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build("vgg11", num_classes=2, image_size=32)
    batches = Batches(scan_folder(data).samples, 32, 5, False, workers=0, rank=rank, world_size=world)
    result = evaluate(model, batches, Step(torch.device("cpu"), "fp32", (0.5,) * 3, (0.25,) * 3), 2)
    torch.save(result, out / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_evaluation_metrics_are_summed_over_processes(two_class_dir: Path, tmp_path: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_evaluate_on_shard, args=(2, port, two_class_dir, tmp_path), nprocs=2)
    torch.manual_seed(0)
    model = build("vgg11", num_classes=2, image_size=32)
    alone = evaluate(
        model,
        Batches(scan_folder(two_class_dir).samples, 32, 5, False, workers=0),
        Step(torch.device("cpu"), "fp32", (0.5,) * 3, (0.25,) * 3),
        2,
    )
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert shared["images"] == alone["images"] == 24
        assert shared["confusion"] == alone["confusion"]
        assert shared["loss"] == pytest.approx(alone["loss"], rel=1e-5)
