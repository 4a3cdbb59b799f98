"""Nothing a file does crashes vgg, hangs it or makes it use unbounded memory (issue 13, the input half).

Where a regression would crash or hang the process, the command runs in a subprocess with a timeout, so that the
test fails instead of taking pytest down with it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, crashing_png, write_images
from PIL import Image

from vgg import doctor, scan
from vgg.checkpoint import ModelInfo, save_model
from vgg.cli import main
from vgg.decoding import decode, decode_bytes
from vgg.isolation import map_isolated
from vgg.models import build

PYTHON = sys.executable
TIMEOUT = 240  # generous on a shared 2-core machine; a hang would otherwise last forever


def _run(*code_or_args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.run([PYTHON, *code_or_args], capture_output=True, text=True, timeout=timeout, env=env)


def _vgg(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return _run("-m", "vgg", *args, timeout=timeout)


def many_frame_gif(side: int, frames: int) -> bytes:
    """A ``side`` x ``side`` GIF of ``frames`` frames, each a 1-pixel change: a few KB that decode to frames x side².

    Written by hand (Pillow would hold every full frame in memory to write it): logical screen, a 2-colour
    table, then per frame a graphic control block, a 1x1 image descriptor and its LZW data (clear, pixel, end).
    """
    out = [b"GIF89a", struct.pack("<HHBBB", side, side, 0x80, 0, 0), bytes([0, 0, 0, 255, 255, 255])]
    for i in range(frames):
        out.append(b"\x21\xf9\x04\x00\x01\x00\x00\x00")
        out.append(b"\x2c" + struct.pack("<HHHHB", i % side, (i // side) % side, 1, 1, 0))
        out.append(b"\x02\x02\x4c\x01\x00")
    return b"".join(out) + b"\x3b"


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_model(path, build("vgg11", 2, 32), ModelInfo("vgg11", ["cat", "dog"], 32, [0.5] * 3, [0.25] * 3))
    return path


# --- the crashing PNG ---------------------------------------------------------------------------------------------


def test_the_crashing_png_kills_torchvision_and_is_a_bad_file_for_vgg():
    """The test file is real: torchvision's native decoder dies on it (SIGSEGV); vgg names it corrupt."""
    native = subprocess.run(
        [
            PYTHON,
            "-c",
            "import sys, torch; from torchvision.io import decode_image; "
            "decode_image(torch.frombuffer(bytearray(sys.stdin.buffer.read()), dtype=torch.uint8))",
        ],
        input=crashing_png(),
        capture_output=True,
        timeout=120,
    )
    assert native.returncode == -signal.SIGSEGV, "torchvision no longer crashes on this file: see decoding.py"
    with pytest.raises(ValueError, match=r"^corrupt png image \("):
        decode_bytes(crashing_png())


def test_training_completes_and_names_the_crashing_png(tmp_path: Path):
    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=6)
    (data / "cat" / "killer.png").write_bytes(crashing_png())
    out = tmp_path / "run"
    for cache in ("ram", "none"):  # decoded once in loader workers, and decoded every epoch by them
        result = _vgg(
            "train", str(data), "--out", str(out / cache), "--epochs", "1", "--arch", "vgg11", "--image-size", "32",
            "--batch-size", "4", "--workers", "1", "--cache", cache,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        with open(out / cache / "skipped.csv", newline="") as handle:
            rows = list(csv.reader(handle))
        assert [row[0].endswith("killer.png") for row in rows[1:]] == [True]
        assert "corrupt png image" in rows[1][1]


def test_predict_and_evaluate_survive_the_crashing_png(model_file: Path, tmp_path: Path):
    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=2)
    (data / "dog" / "killer.png").write_bytes(crashing_png())
    predicted = _vgg("predict", str(model_file), str(data), "--json", "--device", "cpu")
    assert predicted.returncode == 1, predicted.stderr[-2000:]
    answers = json.loads(predicted.stdout)
    assert [a["image"].endswith("killer.png") for a in answers if "error" in a] == [True]
    assert sum("label" in a for a in answers) == 4
    evaluated = _vgg("evaluate", str(model_file), str(data), "--json", "--device", "cpu")
    assert evaluated.returncode == 1, evaluated.stderr[-2000:]
    assert [s["path"].endswith("killer.png") for s in json.loads(evaluated.stdout)["skipped"]] == [True]


def test_doctor_names_a_file_that_crashes_its_decoder(tmp_path: Path, monkeypatch):
    """With a native decoder that does crash (torchvision's, as vgg used to call it), doctor still reports.

    The workers fork from this process, so they decode with the patched function: the crash is real.
    """
    from torchvision.io import decode_image

    def native(data: bytes):
        import torch

        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=3)
    (data / "cat" / "killer.png").write_bytes(crashing_png())
    monkeypatch.setattr(doctor, "decode_bytes", native)
    report = doctor.examine(data, workers=2)
    bad = report["splits"]["train"]["bad_files"]
    assert [(Path(b["path"]).name, b["reason"].split(" (")[0]) for b in bad] == [("killer.png", "decoder crashed")]
    assert report["splits"]["train"]["counts"] == {"cat": 3, "dog": 3}


def _native_decode(path, image_size=None):
    """How vgg decoded PNGs before issue 13: torchvision's native decoder, which dies on the crashing PNG."""
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    image = decode_image(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8), ImageReadMode.RGB)
    return TF.resize(image, [image_size, image_size], antialias=True) if image_size else image


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_a_loader_worker_killed_by_a_decoder_costs_one_file(tmp_path: Path, monkeypatch, cache: str):
    """Second line of defence: should a native decoder still crash in a loader worker, the run goes on.

    The workers fork from this process, so they decode with the patched (crashing) decoder: the crash is real.
    """
    from vgg import batches, loading

    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=5)
    (data / "cat" / "killer.png").write_bytes(crashing_png())
    monkeypatch.setattr(batches, "decode", _native_decode)
    samples = scan.scan_folder(data).samples
    loaded = batches.Batches(samples, 32, batch_size=4, shuffle=True, workers=2, cache=cache)
    seen = sum(len(labels) for _, labels in loaded)
    assert seen == 10
    assert [(Path(path).name, reason) for path, reason in loaded.skipped] == [("killer.png", loading.CRASHED)]


def test_evaluate_survives_a_loader_worker_killed_by_a_decoder(tmp_path: Path, monkeypatch, model_file: Path):
    import vgg
    from vgg import loading

    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=3)
    (data / "dog" / "killer.png").write_bytes(crashing_png())
    monkeypatch.setattr(loading, "decode", _native_decode)
    result = vgg.load(model_file, device="cpu").evaluate(data, batch_size=2, workers=2)
    assert [(Path(s["path"]).name, s["reason"]) for s in result["skipped"]] == [("killer.png", loading.CRASHED)]
    assert sum(sum(row) for row in result["confusion"]) == 6


def _segfault_on_three(n: int) -> int:
    if n == 3:
        os.kill(os.getpid(), signal.SIGSEGV)
    return n * n


def test_map_isolated_gives_the_crashing_item_its_own_result_and_the_rest_theirs():
    done = []
    results = map_isolated(_segfault_on_three, list(range(10)), 2, lambda n: -1, chunk=2, progress=done.append)
    assert results == [0, 1, 4, -1, 16, 25, 36, 49, 64, 81]
    assert sum(done) >= 10


# --- limits -------------------------------------------------------------------------------------------------------


def test_a_300_frame_gif_decodes_its_first_frame_in_bounded_memory(tmp_path: Path):
    """300 frames of 1000 x 1000: torchvision's decoder allocated 860 MB for them; only frame 0 is decoded."""
    path = tmp_path / "anim.gif"
    path.write_bytes(many_frame_gif(1000, 300))
    assert Image.open(path).n_frames == 300
    code = textwrap.dedent(f"""
        import resource, sys
        from vgg.decoding import decode
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        image = decode({str(path)!r}, 32)
        print(tuple(image.shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    result = _run("-c", code, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    shape, growth_mb = result.stdout.rsplit(" ", 1)
    assert shape.strip() == "(3, 32, 32)"
    assert int(growth_mb) < 100, f"decoding one frame grew the process by {growth_mb} MB"


def test_files_over_the_size_limit_are_refused_before_they_are_read(tmp_path: Path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(scan, "MAX_FILE_BYTES", 100)
    with pytest.raises(ValueError, match=r"^file too large \([\d,]+ bytes or more, limit 100 bytes\)"):
        decode(path)
    assert scan.classify(path) == ("bad", f"file too large ({path.stat().st_size:,} bytes or more, limit 100 bytes)")


def test_pixel_bombs_are_refused_from_the_header():
    out = io.BytesIO()
    Image.new("L", (2, 2)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", 20_000, 20_000)  # IHDR width and height (the CRC now fails: Pillow's header)
    with pytest.raises(ValueError, match="image too large|corrupt png"):
        decode_bytes(bytes(data))


# --- named pipes ---------------------------------------------------------------------------------------------------


@pytest.fixture
def data_with_pipe(tmp_path: Path) -> Path:
    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=4)
    os.mkfifo(data / "cat" / "pipe.png")
    os.mkfifo(data / "dog" / "notes")
    return data


def test_a_named_pipe_is_a_bad_file_and_never_opened_for_reading(data_with_pipe: Path):
    assert scan.classify(data_with_pipe / "cat" / "pipe.png") == ("bad", "not a regular file (a named pipe)")
    assert scan.classify(data_with_pipe / "dog" / "notes") == ("other", "")
    with pytest.raises(ValueError, match=r"not a regular file \(a named pipe\)"):
        decode(data_with_pipe / "cat" / "pipe.png")


def test_doctor_train_and_predict_do_not_hang_on_a_named_pipe(data_with_pipe: Path, model_file: Path, tmp_path):
    checked = _vgg("doctor", str(data_with_pipe), "--json")
    assert checked.returncode == 1, checked.stderr[-2000:]  # 1: problems found, the pipe among them
    bad = json.loads(checked.stdout)["splits"]["train"]["bad_files"]
    assert [(Path(b["path"]).name, b["reason"]) for b in bad] == [("pipe.png", "not a regular file (a named pipe)")]
    trained = _vgg(
        "train", str(data_with_pipe), "--out", str(tmp_path / "run"), "--epochs", "1", "--arch", "vgg11",
        "--image-size", "32", "--batch-size", "4", "--workers", "0",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "pipe.png,not a regular file (a named pipe)" in (tmp_path / "run" / "skipped.csv").read_text()
    predicted = _vgg("predict", str(model_file), str(data_with_pipe / "cat" / "pipe.png"), str(data_with_pipe))
    assert predicted.returncode == 1
    assert predicted.stderr.count("pipe.png: not a regular file (a named pipe)") == 2
    assert len(predicted.stdout.splitlines()) == 8


# --- predict and evaluate over many files ------------------------------------------------------------------------


def test_predict_names_each_bad_file_answers_the_rest_and_exits_1(model_file: Path, tmp_path: Path, capsys):
    folder = write_images(tmp_path / "images", {"cat": COLOURS["cat"]}, per_class=3)
    (folder / "cat" / "text.jpg").write_text("not a photo")
    (folder / "cat" / "empty.png").write_bytes(b"")
    Image.new("RGB", (40, 40)).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:60])
    assert main(["predict", str(model_file), str(folder), "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and all(
        line.split(": ")[1].split()[0] in ("cat", "dog") for line in out.splitlines()
    )
    assert "text.jpg: not an image (its content is text)" in err
    assert "empty.png: empty file (0 bytes)" in err
    assert "cut.png: truncated png image" in err or "cut.png: corrupt png image" in err
    assert main(["predict", str(model_file), str(folder), "--device", "cpu", "--json"]) == 1
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 6
    assert {Path(a["image"]).name for a in answers if "error" in a} == {"text.jpg", "empty.png", "cut.png"}
    assert all(set(a) == {"image", "error"} for a in answers if "error" in a)
    good = write_images(tmp_path / "good", {"dog": COLOURS["dog"]}, per_class=2)
    assert main(["predict", str(model_file), str(good), "--device", "cpu"]) == 0


def test_evaluate_exits_1_and_names_bad_files_on_stderr(model_file: Path, tmp_path: Path, capsys):
    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=2)
    (data / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    assert main(["evaluate", str(model_file), str(data), "--device", "cpu"]) == 1
    assert "broken.png: " in capsys.readouterr().err
    (data / "dog" / "broken.png").unlink()
    assert main(["evaluate", str(model_file), str(data), "--device", "cpu"]) == 0


# --- clean data is decoded as before ---------------------------------------------------------------------------


def test_pillow_route_gives_torchvision_s_pixels_on_clean_pngs():
    """PNG, GIF and WebP now go through Pillow; on clean files the pixels are those torchvision gave."""
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(0)
    for mode, shape in (("RGB", (30, 40, 3)), ("L", (30, 40)), ("RGBA", (30, 40, 4))):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(out, format="PNG")
        native = decode_image(torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert torch.equal(decode_bytes(out.getvalue()), native), mode
        assert torch.equal(decode_bytes(out.getvalue(), 32), TF.resize(native, [32, 32], antialias=True)), mode
