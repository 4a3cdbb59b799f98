"""Fuzzing image bytes: thousands of seeded mutations of real PNG, JPEG, GIF and WebP files through ``decode_bytes``
and a few of them through ``vgg predict``: each is an image or a one-line reason, never a traceback, a hang or a
dead process (issue 13). Bounded to about 30 s: a fixed number of mutations, stopped early by a time budget.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vgg.checkpoint import ModelInfo, save_model
from vgg.cli import main
from vgg.models import build

MUTATIONS = 4000
BUDGET_S = 25.0


def seeds() -> dict[str, bytes]:
    """Small real files of each format and of the modes that take different decoder paths."""
    rng = np.random.default_rng(0)
    pixels = np.clip(np.linspace(0, 255, 24)[None, :, None] + rng.normal(0, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(pixels)
    out: dict[str, bytes] = {}

    def save(name: str, image: Image.Image, fmt: str, **options) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        out[name] = buffer.getvalue()

    save("rgb.png", rgb, "PNG")
    save("gray.png", rgb.convert("L"), "PNG")
    save("palette.png", rgb.convert("P"), "PNG", transparency=0)
    save("grey16.png", Image.fromarray(pixels[..., 0].astype(np.uint16) * 257), "PNG")
    save("baseline.jpg", rgb, "JPEG", quality=80)
    save("progressive.jpg", rgb, "JPEG", progressive=True)
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    frames = [rgb, rgb.rotate(90), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("anim.gif", frames[0], "GIF", save_all=True, append_images=frames[1:])
    save("lossy.webp", rgb, "WEBP", quality=70)
    save("lossless.webp", rgb, "WEBP", lossless=True)
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation: flipped bits, random bytes, a cut, a repeated or deleted run, or a mix."""
    data = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4))):
        kind = rng.randrange(6)
        at = rng.randrange(len(data)) if data else 0
        if kind == 0 and data:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:
            data[at] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif kind == 2:
            data = data[: rng.randrange(len(data) + 1)]
        elif kind == 3:
            run = data[at : at + rng.randrange(1, 64)]
            data[at:at] = run * rng.randrange(1, 4)
        elif kind == 4:
            del data[at : at + rng.randrange(1, 32)]
        else:
            end = min(len(data), at + rng.randrange(1, 16))
            data[at:end] = bytes(rng.randrange(256) for _ in range(end - at))
    return bytes(data)


def fuzz(count: int, budget_s: float, seed: int = 0) -> dict:
    """Decode ``count`` mutations (fewer if ``budget_s`` runs out); returns counts and any unexpected exception."""
    import time

    import torch

    from vgg.decoding import decode_bytes

    torch.set_num_threads(1)
    rng = random.Random(seed)
    bases = list(seeds().items())
    counts = {"decoded": 0, "refused": 0}
    start = time.monotonic()
    for i in range(count):
        if time.monotonic() - start > budget_s:
            break
        name, base = bases[i % len(bases)]
        data = mutate(base, rng)
        try:
            image = decode_bytes(data, 32)
        except ValueError as error:
            message = str(error)
            if "\n" in message or not message:
                return {**counts, "unexpected": f"{name} #{i}: multi-line reason {message!r}"}
            counts["refused"] += 1
            continue
        except Exception as error:  # noqa: BLE001  what the test is looking for
            return {**counts, "unexpected": f"{name} #{i}: {type(error).__name__}: {error}"}
        if image.dtype != torch.uint8 or tuple(image.shape) != (3, 32, 32):
            return {**counts, "unexpected": f"{name} #{i}: decoded to {image.dtype} {tuple(image.shape)}"}
        counts["decoded"] += 1
    counts["tried"] = counts["decoded"] + counts["refused"]
    return counts


def test_thousands_of_mutated_images_decode_or_are_refused_in_one_line():
    """In a subprocess: a decoder that crashes the process or hangs fails this test instead of ending pytest."""
    code = f"import json, test_fuzz_images as t; print(json.dumps(t.fuzz({MUTATIONS}, {BUDGET_S})))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1] / "src")]),
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"the decoding process died ({result.returncode}): {result.stderr[-2000:]}"
    counts = json.loads(result.stdout.splitlines()[-1])
    assert "unexpected" not in counts, counts["unexpected"]
    assert counts["tried"] >= 1000, counts  # the budget is for a slow machine, not for skipping the work
    assert counts["decoded"] > 0 and counts["refused"] > 0, counts  # the mutations reach both outcomes


@pytest.fixture(scope="module")
def fuzzed_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzzed")
    rng = random.Random(1)
    for i, (name, data) in enumerate(list(seeds().items()) * 3):
        (folder / f"{i:02d}_{name}").write_bytes(mutate(data, rng) if i >= 10 else data)
    return folder


def test_vgg_predict_on_mutated_files_answers_or_names_each_one(fuzzed_folder: Path, tmp_path: Path, capsys):
    model = tmp_path / "model.safetensors"
    save_model(model, build("vgg11", 2, 32), ModelInfo("vgg11", ["a", "b"], 32, [0.5] * 3, [0.25] * 3))
    files = sorted(str(p) for p in fuzzed_folder.iterdir())
    code = main(["predict", str(model), *files, "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    answers = json.loads(out)
    assert [a["image"] for a in answers] == files  # every file answered, in order
    failed = [a for a in answers if "error" in a]
    assert code == (1 if failed else 0)
    assert all(set(a) == {"image", "error"} and "\n" not in a["error"] for a in failed)
    assert all(a["label"] in ("a", "b") for a in answers if "error" not in a)
    assert sum("error" not in a for a in answers[:10]) == 10  # the unmutated originals
    assert "Traceback" not in err
    text = main(["predict", str(model), *files, "--device", "cpu"])
    out, err = capsys.readouterr()
    assert text == code and len(out.splitlines()) == len(answers) - len(failed)
    assert len(err.splitlines()) == len(failed) and all(line.startswith("error: ") for line in err.splitlines())
