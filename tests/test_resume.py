"""Exact resume: a run killed at any moment continues from RUN_DIR/state.pt to the same end as an unbroken run."""

from __future__ import annotations

import copy
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, fit_with_checkpoints, small_run, write_images
from safetensors.torch import load_file
from torch import nn

from vgg.cli import main
from vgg.errors import UsageError
from vgg.inference import Step
from vgg.scan import scan_folder
from vgg.training.config import TrainConfig
from vgg.training.state import STATE_FILE, load_state, resume_config

TINY = ["--arch", "vgg11", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
EXACT = ["--precision", "fp32", "--seed", "3", "--epochs", "2", "--rotation", "10"]
COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr")


def _vgg(*argv: str | Path) -> list[str]:
    return [sys.executable, "-m", "vgg", *map(str, argv)]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _history(run: Path) -> list[tuple[str, ...]]:
    with open(run / "history.csv", newline="") as handle:
        return [tuple(row[c] for c in COLUMNS) for row in csv.DictReader(handle)]


def test_kill_9_mid_epoch_then_resume_ends_like_an_unbroken_run(tmp_path: Path):
    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=16)
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    subprocess.run(_vgg("train", data, "--out", unbroken, *TINY, *EXACT), env=_env(), check=True, capture_output=True)

    process = subprocess.Popen(
        _vgg("train", data, "--out", broken, "--save-every-steps", "1", *TINY, *EXACT),
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (broken / STATE_FILE).exists():
        assert process.poll() is None, "training ended before its first step was saved"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    interrupted = load_state(broken)  # the file the kill left behind is whole
    assert interrupted["epoch"] < 2 and interrupted["in_epoch"] is not None  # killed mid-epoch (6 steps each)

    resumed = subprocess.run(_vgg("train", "--resume", broken), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {broken} at epoch" in resumed.stdout
    assert _history(broken) == _history(unbroken)  # bit-identical numbers, not merely close
    assert [row[0] for row in _history(broken)] == ["1", "2"]
    best, reference = load_file(broken / "best.safetensors"), load_file(unbroken / "best.safetensors")
    assert best.keys() == reference.keys() and all(torch.equal(best[k], reference[k]) for k in best)
    predicted = subprocess.run(
        _vgg("predict", broken / "best.safetensors", data / "cat" / "cat_000.jpg"), env=_env(), capture_output=True
    )
    assert predicted.returncode == 0 and predicted.stdout.split()[1] in (b"cat", b"dog")


def test_ctrl_c_says_what_the_run_folder_keeps_and_how_to_go_on(tmp_path: Path):
    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=16)
    run = tmp_path / "run"
    process = subprocess.Popen(
        _vgg("train", data, "--out", run, "--save-every-steps", "1", *TINY, *EXACT),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's Ctrl-C finds it
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / STATE_FILE).exists():
        assert process.poll() is None, "training ended before its first step was saved"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip().endswith("interrupted"), err[-2000:]
    said = re.search(rf"interrupted: {re.escape(str(run))} keeps the state after (step|epoch) (\d+)", out)
    assert said, out[-2000:]
    assert f"`vgg train --resume {run}` continues from there" in out
    state = load_state(run)
    # The signal may land between the file's replacement and the note of it: then the file is one step newer.
    saved = state["global_step"] if said[1] == "step" else state["epoch"]
    assert int(said[2]) in (saved, saved - 1)
    resumed = subprocess.run(_vgg("train", "--resume", run), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert [row[0] for row in _history(run)] == ["1", "2"]


class Tiny(nn.Module):
    """Small enough to train in milliseconds, with dropout so the torch RNG matters."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize(("schedule", "cache"), [("cosine", "ram"), ("plateau", "none"), ("onecycle", "ram")])
def test_resume_from_any_checkpoint_replays_the_same_run(two_class_dir: Path, schedule: str, cache: str):
    samples = scan_folder(two_class_dir).samples
    config = TrainConfig(
        epochs=3, batch_size=4, lr=0.05, schedule=schedule, save_every_steps=2, accumulate=2, clip_grad_norm=1.0,
        warmup_epochs=0.5,
    )  # fmt: skip
    config.augment.rotation = 15.0
    step = Step(torch.device("cpu"), "fp32", (0.5,) * 3, (0.25,) * 3, memory_format=torch.contiguous_format)

    def run(state=None, stop_at: int | None = None):
        return fit_with_checkpoints(Tiny, samples, config, step, state, stop_at, cache)

    whole, states, model = run()
    assert len(states) > 3 and any(s["in_epoch"] for s in states) and any(not s["in_epoch"] for s in states)
    for k in (2, len(states) // 2 + 1):  # one mid-epoch checkpoint, one later (epoch end or mid-epoch)
        _, taken, _ = run(stop_at=k)
        resumed, _, resumed_model = run(state=copy.deepcopy(taken[-1]))
        assert [{c: r[c] for c in COLUMNS} for r in resumed.history] == [
            {c: r[c] for c in COLUMNS} for r in whole.history
        ]
        assert resumed.best_epoch == whole.best_epoch
        for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
            assert torch.equal(a, b)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A one-epoch run; tests that change it work on a copy."""
    return small_run(tmp_path_factory.mktemp("finished"), 1, "--batch-size", "4", "--device", "cpu")


def test_the_state_given_as_a_model_points_at_the_run_s_model(finished_run: Path, capsys):
    state = finished_run / STATE_FILE
    assert main(["predict", str(state), str(finished_run / "curves.png")]) == 2
    assert capsys.readouterr().err == (
        f"error: {state} is not a vgg model file (it is the training state of a run, for `vgg train --resume`; "
        f"did you mean {finished_run / 'best.safetensors'}?). Expected a .safetensors file written by `vgg train`.\n"
    )


def test_resume_a_finished_run_with_more_epochs(finished_run: Path, tmp_path: Path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished 1 epochs: pass --epochs N" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    assert [row[0] for row in _history(run)] == ["1", "2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resume", "{tmp}/nowhere"], r"Cannot resume from .*nowhere: the folder does not exist"),
        (["--resume", "{tmp}"], r"Cannot resume from .*: the folder has no config.json and state.pt"),
        (
            ["--resume", "{run}", "--arch", "vgg13"],
            r"Cannot resume .* with arch='vgg13': the run was started with arch",
        ),
        (["--resume", "{run}", "--image-size", "64"], r"with image_size=64: the run was started with image_size=32"),
        (["--resume", "{run}", "--zoom", "0.3"], r"with augment.zoom=0.3: the run was started with augment.zoom=0.0"),
        (["{data3}", "--resume", "{run}"], r"Cannot resume .*: .*data3 has classes \['cat', 'dog', 'fox'\] but"),
        (["--resume", "{run}", "--recipe", "tutorial"], r"--resume takes its settings from .*; drop --config/--recipe"),
    ],
)
def test_bad_resume_is_one_clear_line(argv, message, finished_run, three_class_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, run=finished_run, data3=three_class_dir) for a in argv]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_state_file_that_is_not_a_state(finished_run: Path, tmp_path: Path):
    (tmp_path / STATE_FILE).write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match=r"Cannot resume from .*state.pt: not a readable training state"):
        load_state(tmp_path)
    with pytest.raises(UsageError, match=r"with optimizer='adam': the run was started with optimizer='adamw'"):
        resume_config(finished_run, {"optimizer": "adam", "epochs": 5})
    assert resume_config(finished_run, {"epochs": 5, "arch": "vgg11"}).epochs == 5
