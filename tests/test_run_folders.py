"""A run owns its folder: never replaced by a new run, one writer at a time, resumed only from its own intact files."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, small_run, write_images

from vgg.cli import main
from vgg.files import DiskFull, file_mode, write_json
from vgg.training.config import TrainConfig
from vgg.training.rundir import RUN_FILES, RunLock, own_folder
from vgg.training.state import STATE_FILE, check_resume, load_state, read_run, resume_config, save_state

TINY = ["--arch", "vgg11", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A one-epoch run (root/run) of root/data; tests that change it work on a copy."""
    return small_run(tmp_path_factory.mktemp("finished"), 1, *TINY[4:])


def _copy(run: Path, tmp_path: Path) -> Path:
    return shutil.copytree(run, tmp_path / "run")


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != ".lock"
    }


def _one_error_line(capsys, pattern: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), err
    assert "(unexpected;" not in err
    return lines[0]


def test_a_new_run_never_replaces_an_existing_run(finished: Path, tmp_path: Path, capsys):
    before = _digests(finished)
    missing = tmp_path / "no_such_data"  # the refusal must come before the data is even looked at
    code = main(["train", str(missing), "--out", str(finished), *TINY])
    assert code == 2
    _one_error_line(capsys, rf"{re.escape(str(finished))} already holds a run .*--resume .*--overwrite")
    assert _digests(finished) == before  # byte-identical: nothing written, nothing removed


def test_overwrite_replaces_the_earlier_run(finished: Path, tmp_path: Path, capsys):
    run = _copy(finished, tmp_path)
    (run / "tensorboard").mkdir()
    stale_config = (run / "config.json").read_text()
    data = finished.parent / "data"
    assert main(["train", str(data), "--out", str(run), "--epochs", "1", "--seed", "5", "--overwrite", *TINY]) == 0
    out = capsys.readouterr().out
    assert "--overwrite: removed the earlier run's" in out
    assert not (run / "tensorboard").exists()  # the old run's files are gone, not mixed with the new ones
    assert (run / "config.json").read_text() != stale_config and '"seed": 5' in (run / "config.json").read_text()
    assert load_state(run)["epoch"] == 1


def test_without_out_runs_go_to_the_first_free_default_folder(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "runs" / "train"
    taken.mkdir(parents=True)
    (taken / "config.json").write_text("{}")
    (tmp_path / "runs" / "train2").mkdir()  # an empty folder (a run that failed before writing) is free
    config, lock = own_folder(TrainConfig(data="x"), _single(), resume=False, log=print)
    try:
        assert config.out == "runs/train2"
        other, second = own_folder(TrainConfig(data="x"), _single(), resume=False, log=print)  # train2 is in use
        assert other.out == "runs/train3"
        second.release()
    finally:
        lock.release()
    assert (taken / "config.json").read_text() == "{}"


def _single():
    from vgg.distributed import World

    return World()


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(finished: Path, tmp_path: Path, capsys):
    out = _copy(finished, tmp_path)
    data = finished.parent / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from vgg.training.rundir import RunLock; "
         f"lock = RunLock(Path({str(out)!r})); print('locked', flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _digests(out)
        for argv in (["train", str(data), "--out", str(out), "--overwrite", *TINY], ["train", "--resume", str(out)]):
            assert main(argv) == 2
            _one_error_line(capsys, rf"{re.escape(str(out))} is in use by another `vgg train` \(process {holder.pid}\)")
        # The lock belongs to the process: a kill -9 frees it, with no stale file to clean by hand.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        RunLock(out).release()
        assert _digests(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_a_run_ends_or_fails(tmp_path: Path, two_class_dir: Path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "missing"), "--out", str(out), *TINY]) == 2  # fails after claiming
    _one_error_line(capsys, "Data folder not found")
    RunLock(out).release()  # free again, in the same process
    first = RunLock(out)
    with pytest.raises(Exception, match="in use by another"):
        RunLock(out)
    first.release()


def test_out_on_a_file_or_an_unwritable_folder_is_refused_before_the_data_is_read(tmp_path: Path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    assert main(["train", str(tmp_path / "missing"), "--out", str(file), *TINY]) == 2
    _one_error_line(capsys, r"--out .*notes.txt is a file: expected a folder")
    assert main(["train", str(tmp_path / "missing"), "--out", str(file / "run"), *TINY]) == 2
    _one_error_line(capsys, r"Cannot create the run folder .*notes.txt/run")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "readonly"
        locked.mkdir(mode=0o500)
        assert main(["train", str(tmp_path / "missing"), "--out", str(locked / "run"), *TINY]) == 2
        _one_error_line(capsys, r"Cannot create the run folder .*readonly/run: Permission denied")
        assert main(["train", str(tmp_path / "missing"), "--out", str(locked), *TINY]) == 2
        _one_error_line(capsys, r"Cannot write in the run folder .*readonly: Permission denied")


def test_a_damaged_state_is_refused_never_resumed(finished: Path, tmp_path: Path, capsys):
    run = _copy(finished, tmp_path)
    data = bytearray((run / STATE_FILE).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    (run / STATE_FILE).write_bytes(bytes(data))
    before = _digests(run)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    _one_error_line(capsys, r"Cannot resume from .*state.pt: the file is damaged \(its SHA-256 checksum")
    assert _digests(run) == before
    (run / STATE_FILE).write_bytes(bytes(data[: len(data) // 3]))  # cut short, as by a full disk without atomic writes
    assert main(["train", "--resume", str(run)]) == 2
    _one_error_line(capsys, r"damaged|not a readable training state")


def test_state_contents_are_checked_even_with_a_valid_checksum(tmp_path: Path):
    good = {"epoch": 1, "in_epoch": None, "global_step": 3, "model": {"w": torch.zeros(2)},
            "optimizer": {"state": {}, "param_groups": []}, "schedule": {}, "scaler": None,
            "stopper": {"best": 0.5, "epoch": 1, "bad": 0}, "history": [{"epoch": 1}], "batches": None,
            "rng": [{"torch": torch.get_rng_state(), "cuda": [], "python": None}]}  # fmt: skip
    save_state(tmp_path, good)
    assert load_state(tmp_path)["global_step"] == 3
    for key, value, message in [
        ("epoch", "1", r"'epoch' in the training state must be int. Received: str"),
        ("model", [1, 2], r"'model' in the training state must be dict"),
        ("history", None, r"'history' in the training state must be list"),
        ("epoch", True, r"'epoch' in the training state must be int. Received: bool"),
        ("rng", [], r"inconsistent \(no random-number states\)"),
        ("optimizer", {"state": {}}, r"inconsistent \(no optimizer state or parameter groups\)"),
        ("model", {"w": 3}, r"inconsistent \(model weights that are not named tensors\)"),
    ]:
        save_state(tmp_path, {**good, key: value})
        with pytest.raises(Exception, match=message):
            load_state(tmp_path)
    bad = dict(good)
    del bad["stopper"]
    save_state(tmp_path, bad)
    with pytest.raises(Exception, match=r"the training state has no 'stopper'"):
        load_state(tmp_path)


def test_resume_checks_processes_and_that_state_and_config_are_one_run(finished: Path, tmp_path: Path, capsys):
    run = _copy(finished, tmp_path)
    state, saved, config = load_state(run), read_run(run), resume_config(run, {})
    with pytest.raises(Exception, match=r"with 2 process\(es\): config.json says it was trained with 1"):
        check_resume(state, config, saved, world_size=2)
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text.replace('"world_size": 1', '"world_size": 2'))
    assert main(["train", "--resume", str(run)]) == 2
    _one_error_line(capsys, r"with 1 process\(es\): config.json says it was trained with 2.*--nproc_per_node=2")
    # config.json of another run beside this state.pt (two runs wrote one folder): refused, not mixed.
    (run / "config.json").write_text(text.replace('"label_smoothing": 0.1', '"label_smoothing": 0.2'))
    assert main(["train", "--resume", str(run)]) == 2
    _one_error_line(capsys, r"config.json and state.pt come from different runs \(label_smoothing is 0.2 in one")


def _roles(run: Path) -> set[tuple[str, str, str]]:
    """(file name, class, split) of every row of the run's split.csv."""
    rows = (line.split(",") for line in (run / "split.csv").read_text().splitlines()[1:])
    return {(Path(path).name, label, split) for path, label, split in rows}


def test_resume_keeps_the_runs_split_when_images_were_added(finished: Path, tmp_path: Path, capsys):
    data = shutil.copytree(finished.parent / "data", tmp_path / "data")
    run = _copy(finished, tmp_path)
    write_images(data, {"cat": COLOURS["cat"], "dog": COLOURS["dog"]}, per_class=20, seed=7)  # 8 new images each
    kept = _roles(run)
    assert main(["train", str(data), "--resume", str(run), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "16 images in" in out and "not in the run's split.csv" in out and "epoch 2/2" in out
    # The same images in the same roles (under the folder's new name): no validation image moved into training.
    assert _roles(run) == kept and len(kept) == 24
    assert str(data) in (run / "split.csv").read_text()


def test_resume_follows_a_dataset_that_moved(finished: Path, tmp_path: Path, capsys):
    moved = shutil.copytree(finished.parent / "data", tmp_path / "elsewhere")
    run = _copy(finished, tmp_path)
    assert main(["train", str(moved), "--resume", str(run)]) == 0
    assert "already finished 1 epochs" in capsys.readouterr().out
    assert str(moved) in (run / "split.csv").read_text()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0  # the run now knows the new place
    assert "epoch 2/2" in capsys.readouterr().out


def test_a_split_changed_behind_the_runs_back_is_refused(finished: Path, tmp_path: Path, capsys):
    run = _copy(finished, tmp_path)
    lines = (run / "split.csv").read_text().splitlines()
    moved = next(i for i, line in enumerate(lines) if line.endswith(",val"))
    lines[moved] = lines[moved][: -len("val")] + "train"  # a validation image moved into training
    (run / "split.csv").write_text("\n".join(lines) + "\n")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    _one_error_line(capsys, r"split.csv is not the split state.pt was trained on")


def test_stale_temp_files_of_a_killed_save_are_removed(finished: Path, tmp_path: Path, capsys):
    run = _copy(finished, tmp_path)
    stale = [run / ".state.pt.k2j3h4.tmp", run / ".best.safetensors.a8b7.tmp", run / ".history.csv.zz.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    mine = run / ".notes.txt.tmp"  # not a run file's temp: left alone
    mine.write_text("keep")
    assert main(["train", "--resume", str(run)]) == 0
    assert "removed 3 temp files that an interrupted save left" in capsys.readouterr().out
    assert not any(p.exists() for p in stale) and mine.exists()


def test_files_get_the_mode_the_umask_allows(finished: Path, tmp_path: Path):
    for name in RUN_FILES:
        if (finished / name).exists():
            assert (finished / name).stat().st_mode & 0o777 == file_mode(), name
    old = os.umask(0o027)
    try:
        assert file_mode() == 0o640
        write_json(tmp_path / "a.json", {"a": 1})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        save_state(tmp_path, {"x": 1})
        assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_a_full_disk_says_so_and_keeps_the_last_good_state(finished: Path, tmp_path: Path, capsys, monkeypatch):
    run = _copy(finished, tmp_path)
    good = (run / STATE_FILE).read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        DiskFull, match=r"No space left on the device to write .*state.pt: the previous state.pt is kept"
    ):
        save_state(run, {"x": 1})
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    _one_error_line(capsys, r"No space left on the device .*state.pt: the previous state.pt is kept.*--resume")
    assert (run / STATE_FILE).read_bytes() == good
    assert not list(run.glob(".*.tmp"))
    monkeypatch.undo()
    assert load_state(run)["epoch"] == 1


def test_resume_and_overwrite_together_is_refused(finished: Path, capsys):
    assert main(["train", "--resume", str(finished), "--overwrite"]) == 2
    _one_error_line(capsys, r"--resume continues the run in .* and --overwrite replaces it")


def test_a_state_written_before_checksums_still_resumes(finished: Path, tmp_path: Path, caplog):
    run = _copy(finished, tmp_path)
    state = load_state(run)
    torch.save({**state, "format": "vgg.state/1"}, run / STATE_FILE)
    assert load_state(run)["epoch"] == 1
    assert "has no checksum" in caplog.text


def test_the_folder_is_flushed_after_each_rename(tmp_path: Path, monkeypatch):
    flushed: list[tuple[bool, str]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        flushed.append((stat.S_ISDIR(os.fstat(fd).st_mode), os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_json(tmp_path / "a.json", {"a": 1})
    # The file's content first (under its temp name), then the folder that now names it.
    assert [is_dir for is_dir, _ in flushed] == [False, True] and flushed[1][1] == str(tmp_path)
    assert flushed[0][1].startswith(str(tmp_path / ".a.json."))
