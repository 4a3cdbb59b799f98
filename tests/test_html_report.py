"""vgg report: one self-contained HTML page per run, checked in a real headless browser."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from browser import headless_chromium
from conftest import write_images

from vgg.checkpoint import ModelInfo, save_model
from vgg.cli import main
from vgg.errors import UsageError
from vgg.models import build
from vgg.report import write_history

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder as `vgg train` leaves it: model, config.json, split.csv, skipped.csv, history.csv."""
    data = write_images(tmp_path / "data", COLOURS, per_class=4)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = build("vgg11", 3, 32)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(50)  # confident and often wrong: a gallery to show
    save_model(run / "best.safetensors", model, ModelInfo("vgg11", list(COLOURS), 32, [0.5] * 3, [0.25] * 3))
    (run / "config.json").write_text(json.dumps({"arch": "vgg11", "epochs": 1, "data": str(data), "lr": 0.001}))
    with open(run / "split.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "class", "split"])
        for name in COLOURS:
            for i, path in enumerate(sorted((data / name).iterdir())):
                writer.writerow([str(path), name, "val" if i % 2 else "train"])
    (run / "skipped.csv").write_text("path,reason\n/data/red/broken.jpg,truncated image\n")
    rows = [
        {"epoch": e, "loss": 1 / e, "accuracy": 0.5, "val_loss": 1.1 / e, "val_accuracy": 0.4, "lr": 1e-3,
         "images_per_s": 50.0, "seconds": 1.0}
        for e in (1, 2)
    ]  # fmt: skip
    write_history(run / "history.csv", rows)
    return run


def test_report_cli_writes_a_self_contained_page(run_dir: Path, capsys):
    assert main(["report", str(run_dir), "--device", "cpu"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing fetched, no code
    for section in ("Settings", "Data", "Training curves", "Evaluation", "Confusion matrix", "Calibration"):
        assert f"<h2>{section}</h2>" in page
    assert "truncated image" in page and "1 files skipped" in page
    assert "the run&#x27;s 6 validation images" in page  # split.csv's val rows, 2 per class
    assert page.count("<img ") >= 4


def test_report_on_another_folder_and_a_folder_without_model(run_dir: Path, tmp_path: Path):
    other = write_images(tmp_path / "other", COLOURS, per_class=2, seed=3)
    assert main(["report", str(run_dir), "--data", str(other), "--device", "cpu"]) == 0
    assert f"evaluated on {other}" in (run_dir / "report.html").read_text()
    (tmp_path / "empty").mkdir()
    from vgg.html_report import write_report

    with pytest.raises(UsageError, match="No model in .*empty: expected best.safetensors or last.safetensors"):
        write_report(tmp_path / "empty")


def test_report_renders_in_chromium_without_console_errors(run_dir: Path):
    from vgg.html_report import write_report

    path = write_report(run_dir, device="cpu")
    with headless_chromium() as driver:
        driver.get(path.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
        )
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        gallery = driver.execute_script("return document.querySelectorAll('.gallery figure').length;")
    assert errors == []
    assert len(images) >= 4
    assert all(complete and width > 0 for _, complete, width in images), images
    assert gallery >= 1  # the over-confident model gets some of the 6 images wrong, each shown with its Grad-CAM


def test_training_calibrates_the_best_model_and_writes_the_report(tmp_path: Path, capsys):
    from conftest import small_run

    from vgg.checkpoint import read_info

    run = small_run(tmp_path, 1)
    out = capsys.readouterr().out
    assert "calibration on 4 validation images: temperature" in out  # 20% of 2 x 12 images
    assert f"report: {run / 'report.html'}" in out
    assert read_info(run / "best.safetensors").temperature != 1.0
    assert "<h2>Calibration</h2>" in (run / "report.html").read_text()
