"""`vgg doctor` on folders as users have them: every problem named, exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import MESSY_BAD, write_images, write_messy_dataset

from vgg.cli import main
from vgg.doctor import examine
from vgg.errors import UsageError


def test_doctor_names_every_problem_in_a_messy_folder(tmp_path: Path):
    root = write_messy_dataset(tmp_path / "messy")
    report = examine(root, workers=0)
    train = report["splits"]["train"]
    assert report["trainable"]
    assert train["counts"] == {"cat": 12, "dog": 12}  # the unusual formats are usable images
    reasons = {str(Path(b["path"]).relative_to(root)): b["reason"] for b in train["bad_files"]}
    assert set(reasons) == set(MESSY_BAD)
    for name, reason in MESSY_BAD.items():
        assert reason in reasons[name]
        assert any(name in problem for problem in report["problems"])
    assert [str(Path(p).relative_to(root)) for p in train["non_image_files"]] == ["cat/readme.txt"]
    assert {"RGB", "CMYK", "I;16", "P"} <= set(train["colour_modes"])
    assert train["animated"] == 1 and train["exif_rotated"] == 1
    assert train["sizes"]["width"]["min"] == 20 and train["sizes"]["width"]["max"] == 40
    assert train["duplicates"] == [] and report["leakage"] == []
    assert len(report["problems"]) == len(MESSY_BAD)  # nothing else is called a problem


def test_duplicates_leakage_and_imbalance(tmp_path: Path):
    data = write_images(tmp_path / "train", {"a": (0, 0, 0)}, per_class=12, size=8)
    write_images(data, {"b": (250, 250, 250)}, per_class=3, size=8, seed=1)
    val = write_images(tmp_path / "val", {"a": (0, 0, 0), "b": (250, 250, 250)}, per_class=2, size=8, seed=2)
    shutil.copy(data / "a" / "a_000.jpg", data / "a" / "copy.jpg")
    shutil.copy(data / "b" / "b_001.png", val / "b" / "leaked.png")
    report = examine(data, val, workers=0)
    assert report["splits"]["train"]["duplicates"] == [[str(data / "a" / "a_000.jpg"), str(data / "a" / "copy.jpg")]]
    assert report["leakage"] == [[str(data / "b" / "b_001.png"), str(val / "b" / "leaked.png")]]
    assert report["imbalance"] == pytest.approx(13 / 3)
    assert any("identical files" in p for p in report["problems"])
    assert any(p.startswith("leakage: 1 validation images") for p in report["problems"])
    assert any("imbalanced 4.3x" in w for w in report["warnings"])


def test_validation_with_other_classes_is_not_trainable(tmp_path: Path):
    data = write_images(tmp_path / "train", {"a": (0, 0, 0), "b": (9, 9, 9)}, per_class=3, size=8)
    val = write_images(tmp_path / "val", {"a": (0, 0, 0), "c": (9, 9, 9)}, per_class=2, size=8)
    report = examine(data, val, workers=0)
    assert not report["trainable"]
    assert "validation classes differ from training classes: missing ['b'], unexpected ['c']" in report["problems"]


def test_cli_exit_codes_and_json(tmp_path: Path, capsys):
    clean = write_images(tmp_path / "clean", {"a": (0, 0, 0), "b": (250, 250, 250)}, per_class=4, size=8)
    assert main(["doctor", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "problems: 0" in out and "verdict: trainable" in out
    messy = write_messy_dataset(tmp_path / "messy")
    assert main(["doctor", str(messy), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["splits"]["train"]["bad_files"]) == len(MESSY_BAD)
    assert main(["doctor", str(tmp_path / "nowhere")]) == 2
    assert "Data folder not found" in capsys.readouterr().err


def test_missing_folder_is_a_usage_error(tmp_path: Path):
    with pytest.raises(UsageError, match=r"Data folder not found: .*nowhere is nothing"):
        examine(tmp_path / "nowhere")
