"""Every value that crosses a boundary is checked: flags, model-file headers, index caches, split files. Whatever
gets through anyway is one line on stderr and exit code 2, never a traceback; a closed pipe ends quietly."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, write_images
from safetensors import safe_open
from safetensors.torch import save_file

from vgg import cli
from vgg.checkpoint import ModelInfo, save_model
from vgg.cli import main
from vgg.errors import UsageError
from vgg.models import build
from vgg.scan import _cache_file, index_folder, scan_folder
from vgg.splits import read_split


def _one_error_line(capsys, pattern: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), err
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "nan"], r"lr must be a finite number. Received: lr=nan"),
        (["--lr", "-1"], r"lr must be positive"),
        (["--dropout", "2"], r"dropout must be between 0 and 1. Received: dropout=2.0"),
        (["--label-smoothing", "2"], r"label_smoothing must be between 0 and 1"),
        (["--workers", "-1"], r"workers must be between 0 and 256. Received: workers=-1"),
        (["--momentum", "-1"], r"momentum must be between 0 and 1. Received: momentum=-1.0"),
        (["--weight-decay", "inf"], r"weight_decay must be a finite number"),
        (["--val-fraction", "0"], r"val_fraction must be between 0 and 1 \(both excluded\)"),
        (["--image-size", "4096"], r"image_size must be between 32 and 2048. Received: image_size=4096"),
        (["--image-size", "8"], r"image_size must be between 32 and 2048"),
        (["--epochs", "0"], r"epochs must be between 1 and 1000000"),
        (["--epochs", str(10**30)], r"epochs must be between 1 and 1000000"),
        (["--batch-size", "0"], r"batch_size must be a positive integer"),
        (["--batch-size", "many"], r"expected a positive integer or 'auto', received 'many'"),
        (["--gamma", "1.5"], r"gamma \(learning-rate decay\) must be between 0 and 1"),
        (["--zoom", "2"], r"zoom must be between 0 and 1"),
    ],
)
def test_bad_training_flags_are_one_line_before_anything_is_read(flags, message, tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "missing"), "--out", str(out), *flags]) == 2
    _one_error_line(capsys, message)
    assert not out.exists()  # refused before the run folder was even made


def test_config_file_values_are_checked_like_flags(tmp_path: Path, capsys):
    config = tmp_path / "run.json"
    for settings, message in [
        ({"lr": "fast"}, r"lr must be a number or None|lr must be a number"),
        ({"dropout": 7}, r"dropout must be between 0 and 1"),
        ({"augment": 3}, r"augment must be a table of settings"),
        ({"epochs": 2.5}, r"epochs must be an integer"),
    ]:
        config.write_text(json.dumps(settings))
        assert main(["train", str(tmp_path), "--config", str(config)]) == 2
        _one_error_line(capsys, message)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    info = ModelInfo("vgg11", ["cat", "dog"], 32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    save_model(path, build("vgg11", num_classes=2, image_size=32), info)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    root = write_images(tmp_path_factory.mktemp("images"), {"cat": COLOURS["cat"]}, per_class=2)
    return root / "cat" / "cat_000.jpg"


def _with_info(model_file: Path, target: Path, change: dict | None = None, raw: str | None = None) -> Path:
    """A copy of ``model_file`` whose header ``info`` is changed (keys set to None are removed) or replaced."""
    with safe_open(str(model_file), framework="pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    info = json.loads(header["info"])
    for key, value in (change or {}).items():
        if value is None:
            info.pop(key, None)
        else:
            info[key] = value
    save_file(tensors, str(target), metadata={**header, "info": raw if raw is not None else json.dumps(info)})
    return target


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": "32"}, r"image_size in the header must be an integer from 32 to 2048. Received: '32'"),
        ({"image_size": 120000}, r"image_size in the header must be an integer from 32 to 2048. Received: 120000"),
        (
            {"image_size": 64},
            r"image_size 64 in the header needs 2048 inputs to the first dense layer, but the weights",
        ),
        ({"image_size": True}, r"image_size in the header must be an integer"),
        ({"mean": [0.5, 0.5]}, r"mean in the header must be 3 finite numbers \(R, G, B\). Received: \[0.5, 0.5\]"),
        ({"mean": [0.5, "x", 0.5]}, r"mean in the header must be 3 finite numbers"),
        ({"std": [0, 0, 0]}, r"std in the header must be 3 positive numbers from 0.0001 to 10000"),
        ({"std": [-0.2, 0.2, 0.2]}, r"std in the header must be 3 positive numbers"),
        ({"mean": [1e308, 0, 0]}, r"mean in the header must be 3 numbers from -10000 to 10000"),
        ({"class_names": [f"c{i}" for i in range(2_000_000)]}, r"the header names 2000000 classes but the output"),
        ({"class_names": ["cat", "dog", "fox"]}, r"the header names 3 classes but the output layer has 2 outputs"),
        ({"class_names": "cat,dog"}, r"class_names in the header must be a list of names"),
        ({"class_names": ["cat", 7]}, r"class_names in the header must be a list of names"),
        ({"class_names": None}, r"the header has no 'class_names'"),
        ({"arch": "vgg12"}, r"arch in the header must be one of \{vgg11, .*\}. Received: 'vgg12'"),
        ({"arch": ["vgg11"]}, r"arch in the header must be one of"),
        ({"dropout": 2}, r"dropout in the header must be a number from 0 to 1"),
        ({"resize": "zoom"}, r"resize in the header must be one of \{squash, crop\}"),
        ({"resize": "crop", "extra": {"resize_size": 10**9}}, r"extra.resize_size in the header must be an integer"),
        ({"interpolation": "cubic"}, r"interpolation in the header must be one of \{bilinear, nearest\}"),
        ({"temperature": 0}, r"temperature in the header must be a positive number"),
        ({"temperature": "hot"}, r"temperature in the header must be a positive number"),
        ({"extra": []}, r"extra in the header must be a JSON object"),
        ({"backdoor": "os.system"}, r"unknown field 'backdoor' in the header"),
    ],
)
def test_each_bad_header_value_is_one_line(change, message, model_file, image, tmp_path, capsys):
    bad = _with_info(model_file, tmp_path / "bad.safetensors", change)
    for argv in (["predict", str(bad), str(image), "--json"], ["evaluate", str(bad), str(image.parent.parent)]):
        assert main(argv) == 2
        _one_error_line(capsys, message)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[1, 2]", r"info in the header must be a JSON object"),
        ('{"arch": "vgg11"', r"is not a vgg model file \(JSONDecodeError"),
        ("[" * 100_000 + "]" * 100_000, r"nested too deeply|not a vgg model file"),
        (
            json.dumps(
                {
                    "arch": "vgg11",
                    "class_names": ["a", "b"],
                    "image_size": 32,
                    "mean": [0.5] * 3,
                    "std": [float("nan")] * 3,
                }
            ),
            r"std in the header must be 3 finite numbers",
        ),  # fmt: skip
    ],
)
def test_a_header_that_is_not_an_info_is_one_line(raw, message, model_file, image, tmp_path, capsys):
    bad = _with_info(model_file, tmp_path / "bad.safetensors", raw=raw)
    assert main(["predict", str(bad), str(image)]) == 2
    _one_error_line(capsys, message)


def test_non_finite_weights_are_refused(model_file, image, tmp_path, capsys):
    with safe_open(str(model_file), framework="pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["features.0.weight"][0, 0, 0, 0] = math.inf
    save_file(tensors, str(tmp_path / "inf.safetensors"), metadata=header)
    assert main(["predict", str(tmp_path / "inf.safetensors"), str(image), "--json"]) == 2
    _one_error_line(capsys, r"the weights features.0.weight are not finite numbers \(NaN or infinity\)")


def test_evaluate_batch_size_must_be_positive(model_file, image, capsys):
    for size in ("0", "-3", "x"):
        assert main(["evaluate", str(model_file), str(image.parent.parent), "--batch-size", size]) == 2
        _one_error_line(capsys, rf"--batch-size: expected a positive integer, received '{size}'")


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something deep\nwith a second line")

    monkeypatch.setattr(cli, "_summary", broken)
    assert main(["summary"]) == 2
    line = _one_error_line(capsys, r"RuntimeError: something deep with a second line \(unexpected; `vgg --debug")
    assert "Traceback" not in line
    with pytest.raises(RuntimeError, match="something deep"):
        main(["--debug", "summary"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_summary", interrupted)
    assert main(["summary"]) == 130


def test_usage_errors_spanning_lines_are_printed_as_one(monkeypatch, capsys):
    def two_lines(args):
        raise UsageError("first\nsecond")

    monkeypatch.setattr(cli, "_summary", two_lines)
    assert main(["summary"]) == 2
    _one_error_line(capsys, r"^error: first second$")


def test_a_closed_pipe_ends_quietly(model_file, image):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "vgg", "predict", str(model_file), *[str(image)] * 50, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    process.stdout.close()  # as `| head -1` does once it has its line
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141
    assert err == "", err


def _folder_for_cache(tmp_path: Path) -> Path:
    root = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=3)
    (root / "cat" / "notes.txt").write_text("x")
    return root


@pytest.mark.parametrize(
    "content",
    [
        "not json at all",
        "[1, 2, 3]",
        "[" * 50_000 + "]" * 50_000,
        "{}",
        '{"version": 1, "root": "ROOT", "folders": [], "files": []}',
        '{"version": 1, "root": "ROOT", "folders": {".": "yesterday"}, "files": []}',
        '{"version": 1, "root": "ROOT", "folders": {"../..": 1}, "files": []}',
        '{"version": 1, "root": "ROOT", "folders": FOLDERS, "files": [1, 2]}',
        '{"version": 1, "root": "ROOT", "folders": FOLDERS, "files": [["cat/a.png", "image"]]}',
        '{"version": 1, "root": "ROOT", "folders": FOLDERS, "files": [["../../etc/passwd", "image", ""]]}',
        '{"version": 1, "root": "ROOT", "folders": FOLDERS, "files": [["cat/a.png", "virus", ""]]}',
        '{"version": 1, "root": "ROOT", "folders": FOLDERS, "files": [[1, "image", ""]]}',
    ],
)
def test_a_malformed_index_cache_is_ignored_and_rebuilt(content: str, tmp_path: Path):
    root = _folder_for_cache(tmp_path)
    expected = index_folder(root, cache=False).files
    folders = {os.path.relpath(d, root): os.stat(d).st_mtime_ns for d in (root, root / "cat", root / "dog")}
    cache = _cache_file(root)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(content.replace("ROOT", str(root.resolve())).replace("FOLDERS", json.dumps(folders)))
    assert index_folder(root, cache=True, cache_min_files=1).files == expected
    assert json.loads(cache.read_text())["files"] == [list(row) for row in expected]  # rewritten
    assert len(scan_folder(root).samples) == 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"path,class,split\nPATH,cat\n", r"line 2: expected path,class,split"),
        (b"path,class,split\n\xff\xfe,cat,train\n", r"is not a readable CSV file"),
        (b"path,class,split\n" + b"x" * 200_000 + b",cat,train\n", r"is not a readable CSV file"),
        (b"path,class,split\nPA\x00TH,cat,train\n", r"line 2: expected path,class,split|not a readable CSV"),
        (b"path,class,split\n" + b"a" * 5000 + b",cat,train\n", r"lists 1 files that do not exist"),
        (b"path,class\nPATH,cat\n", r"must have the columns path,class,split"),
        (b"path,class,split\nPATH,cat,test\n", r"split must be train or val"),
    ],
)
def test_a_malformed_split_file_is_one_line(content: bytes, message: str, tmp_path: Path):
    image = write_images(tmp_path / "data", {"cat": COLOURS["cat"]}, per_class=1) / "cat" / "cat_000.jpg"
    split = tmp_path / "split.csv"
    split.write_bytes(content.replace(b"PATH", str(image).encode()))
    with pytest.raises(UsageError, match=message):
        read_split(split, ["cat"])


def test_safetensors_header_length_beyond_the_file_is_refused(tmp_path: Path, image, capsys):
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    assert main(["predict", str(bad), str(image)]) == 2
    _one_error_line(capsys, r"is not a vgg model file")


def test_state_of_a_torch_tensor_file_is_not_a_model(tmp_path: Path, image, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert main(["predict", str(tmp_path / "model.safetensors"), str(image)]) == 2
    _one_error_line(capsys, r"is not a vgg model file")
