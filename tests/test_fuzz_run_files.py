"""Fuzzing the files a run leaves behind: thousands of damaged copies of a real model file, state.pt, config.json and
split.csv go through the in-process command line (``predict``, ``evaluate``, ``train --resume``, ``train --split``).

Whatever the damage: no traceback, no hang, exit code 0, 1 or 2, and a failure is exactly one ``error:`` line that
vgg anticipated (never the catch-all "unexpected" line). Seeded (``VGG_FUZZ_SEED``) and bounded in time
(``VGG_FUZZ_SECONDS``, default 30 s of mutations after a one-epoch training run of a 32 px vgg11).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import COLOURS, write_images

from vgg.checkpoint import read_info
from vgg.cli import main
from vgg.errors import UsageError
from vgg.splits import read_split
from vgg.training.state import fingerprint, read_run, resume_config

SEED = int(os.environ.get("VGG_FUZZ_SEED", "13"))
SECONDS = float(os.environ.get("VGG_FUZZ_SECONDS", "30"))
CASE_SECONDS = 120  # one case longer than this is a hang
# A damaged file that still reads as valid costs a whole model load or training epoch (seconds, not milliseconds):
# only this share of those is run to the end, so that the time goes to the many more that must be refused.
VALID_SHARE = 0.05
# Values a damaged or hand-edited JSON file may hold where another was expected.
POOL = [
    None, True, False, 0, -1, 1, 2, 3, 2**31, 10**30, -(10**30), 1e308, -1e-308, float("nan"), float("inf"), 0.5,
    "", "x", "32", "vgg11", "vgg19_bn", "nearest", "crop", "cpu", "../../etc", "\u0000", "a" * 1000,
    [], [1, 2], [0.5, 0.5, 0.5], [0, 0, 0], ["a", "b"], ["cat", "dog", "fox"], {}, {"a": 1},
]  # fmt: skip
# Settings whose valid values legitimately cost minutes (a compile), not what this test is about.
EXPENSIVE = {"compile"}


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so the command line cannot turn it into an error line."""


def _alarm(signum, frame):
    raise Hang


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    data = write_images(root / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=4, size=32)
    run = root / "run"
    argv = [
        "train",
        str(data),
        "--out",
        str(run),
        "--arch",
        "vgg11",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--optimizer",
        "sgd",
        "--momentum",
        "0",
    ]  # fmt: skip  (plain SGD keeps no per-weight state: state.pt stays model-sized)
    assert main(argv) == 0
    return {"root": root, "data": data, "run": run, "image": data / "cat" / "cat_000.jpg"}


# -- mutations ------------------------------------------------------------------------------------------------------


def flip_bits(rng: random.Random, data: bytes, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray(data)
    end = len(out) if end is None else end
    for _ in range(rng.choice((1, 1, 2, 8, 64))):
        i = rng.randrange(start, end)
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, data: bytes, start: int = 0, end: int | None = None) -> bytes:
    return data[: rng.randrange(start, len(data) if end is None else end)]


def splat(rng: random.Random, data: bytes, start: int = 0, end: int | None = None) -> bytes:
    end = len(data) if end is None else end
    at = rng.randrange(start, end)
    size = rng.choice((1, 8, 64, 4096))
    fill = rng.choice((b"\xff" * size, b"\x00" * size, rng.randbytes(size)))
    return data[:at] + fill[: max(0, end - at)] + data[at + size :]


def substitute(rng: random.Random, value, skip: set[str] = frozenset()):
    """``value`` (decoded JSON) with one randomly chosen leaf or member replaced, removed or added."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice([k for k in value if k not in skip] or list(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.1:
            del out[key]
        elif roll < 0.15:
            out[rng.choice(("extra_key", "temperature", "interpolation", "arch"))] = rng.choice(POOL)
        else:
            out[key] = substitute(rng, value[key], skip)
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        out = list(value)
        i = rng.randrange(len(out))
        roll = rng.random()
        if roll < 0.1:
            del out[i]
        elif roll < 0.2:
            out.append(rng.choice(POOL))
        else:
            out[i] = substitute(rng, out[i], skip)
        return out
    return rng.choice(POOL)


def dump(rng: random.Random, value) -> str:
    return json.dumps(value, indent=rng.choice((None, 2)))


# -- model files ----------------------------------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def model_mutations(
    rng: random.Random, original: bytes
) -> dict[str, Callable[[], tuple[bytes, int, list[tuple[int, bytes]]]]]:
    """Damaged model files as (leading bytes, total length, patches): a header change keeps the weights' length, whose
    bytes are then left as a hole (zeros) in the file, so that a case costs a header's write, not 100 MB; damage to
    the weights is a few patches (offset, bytes) on a copy of the original file."""
    header, body = split_safetensors(original)
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    info = json.loads(header["__metadata__"]["info"])

    def info_value() -> bytes:
        changed = info
        for _ in range(rng.choice((1, 1, 2, 3))):
            changed = substitute(rng, changed)
        meta = {**header["__metadata__"], "info": dump(rng, changed)}
        start = join_safetensors({**header, "__metadata__": meta})
        return start, len(start) + len(body), []

    def header_value() -> tuple[bytes, int, list]:
        start = join_safetensors(substitute(rng, header, skip={"__metadata__"}))
        return start, len(start) + len(body), []

    def header_bytes() -> tuple[bytes, int, list]:
        damaged = rng.choice((flip_bits, splat, truncate))(rng, original[:header_end], 0, header_end)
        return damaged, len(original) if len(damaged) == header_end else len(damaged), []

    def weight_bytes() -> tuple[bytes, int, list]:
        if rng.random() < 0.2:  # cut short
            return original[:header_end], rng.randrange(header_end, len(original)), []
        patches = []
        for _ in range(rng.choice((1, 2, 8))):
            at = rng.randrange(header_end, len(original) - 4096)
            size = rng.choice((1, 4, 4096))
            chunk = original[at : at + size]
            patches.append((at, rng.choice((flip_bits(rng, chunk), b"\xff" * size, rng.randbytes(size)))))
        return b"", len(original), patches

    headers = [info_value] * 4 + [header_value, header_bytes]
    return {"model header": lambda: rng.choice(headers)(), "model weights": weight_bytes}


# -- the run -----------------------------------------------------------------------------------------------------------


def case_folder(run: Path, target: Path, name: str, content: bytes) -> Path:
    """A run folder whose ``name`` is ``content`` and whose other files link to the pristine run's."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for path in run.iterdir():
        if path.is_file() and path.name != name and not path.name.startswith("."):
            (target / path.name).symlink_to(path)
    (target / name).write_bytes(content)
    return target


def text_mutation(rng: random.Random, original: bytes, structured: Callable[[], bytes]) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        return structured()
    return rng.choice((flip_bits, splat, truncate))(rng, original)


def split_rows(rng: random.Random, original: bytes) -> bytes:
    lines = original.decode().splitlines()
    header, rows = lines[0], [line.split(",") for line in lines[1:]]
    roll = rng.random()
    if roll < 0.25:
        row = rng.choice(rows)
        row[2] = {"train": "val", "val": "train"}.get(row[2], "train")
    elif roll < 0.45:
        rows.pop(rng.randrange(len(rows)))
    elif roll < 0.6:
        rows.append(list(rng.choice(rows)))
    elif roll < 0.8:
        row = rng.choice(rows)
        row[rng.randrange(3)] = str(rng.choice(POOL))
    else:
        rng.choice(rows).pop()
    return ("\n".join([header, *(",".join(r) for r in rows)]) + "\n").encode()


def _would_resume(case: Path, original: dict) -> None:
    """Raises UsageError when ``vgg train --resume case`` would refuse its config.json before training."""
    config, saved = resume_config(case, {}), read_run(case)
    if saved.world_size != 1 or fingerprint(config) != original:
        raise UsageError("refused")


def _valid(read: Callable[[], object]) -> bool:
    try:
        read()
    except UsageError:
        return False
    return True


def _strict_json(text: str) -> bool:
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        json.loads(text, parse_constant=refuse)
    except ValueError:
        return False
    return True


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_damaged_run_files_never_crash_hang_or_print_a_traceback(tiny, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a damaged path ("", ".") must not reach the user's folders
    rng = random.Random(SEED)
    run, image, data = tiny["run"], tiny["image"], tiny["data"]
    pristine = {p.name: _digest(p) for p in run.iterdir() if p.is_file() and not p.name.startswith(".")}
    model = run / "best.safetensors"
    original = model.read_bytes()
    next_model = model_mutations(rng, original)
    patched = Path(shutil.copyfile(model, tmp_path / "patched.safetensors"))
    undo: list[tuple[int, bytes]] = []

    def restore() -> None:
        with open(patched, "r+b") as handle:
            for at, chunk in reversed(undo):
                handle.seek(at)
                handle.write(chunk)
        undo.clear()

    config = (run / "config.json").read_bytes()
    state = (run / "state.pt").read_bytes()
    split = (run / "split.csv").read_bytes()
    case = tmp_path / "case"

    def model_case(kind: str) -> list[str] | None:
        start, length, patches = next_model[kind]()
        if start:
            path = tmp_path / "model.safetensors"
            with open(path, "wb") as handle:
                handle.write(start)
                handle.truncate(length)
        else:  # patches on a working copy, undone after the case
            path = patched
            with open(path, "r+b") as handle:
                for at, chunk in patches:
                    handle.seek(at)
                    handle.write(chunk)
            undo.extend((at, original[at : at + len(chunk)]) for at, chunk in patches)
        if kind == "model header" and _valid(lambda: read_info(path)) and rng.random() > VALID_SHARE:
            return None
        if rng.random() < 0.85:
            return ["predict", str(path), str(image), "--json"]
        return ["evaluate", str(path), str(data), "--batch-size", "8"]

    def config_case() -> list[str]:
        def structured() -> bytes:
            return dump(rng, substitute(rng, json.loads(config), skip=EXPENSIVE)).encode()

        case_folder(run, case, "config.json", text_mutation(rng, config, structured))
        if _valid(lambda: _would_resume(case, fingerprint(resume_config(run, {})))) and rng.random() > VALID_SHARE:
            return None
        return ["train", "--resume", str(case)]

    def state_case() -> list[str]:
        case_folder(run, case, "state.pt", rng.choice((flip_bits, splat, truncate))(rng, state))
        return ["train", "--resume", str(case)]

    def split_case() -> list[str]:
        mutated = text_mutation(rng, split, lambda: split_rows(rng, split))
        if rng.random() < 0.5:
            case_folder(run, case, "split.csv", mutated)
            return ["train", "--resume", str(case)]
        (tmp_path / "split.csv").write_bytes(mutated)
        if _valid(lambda: read_split(tmp_path / "split.csv", ["cat", "dog"])) and rng.random() > VALID_SHARE:
            return None
        out = tmp_path / f"fresh{rng.randrange(10**9)}"
        return ["train", str(data), "--split", str(tmp_path / "split.csv"), "--out", str(out), "--arch", "vgg11",
                "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                "--no-cache-features"]  # fmt: skip

    # Shares of the time budget: model headers are cheap to try, resumes read a 100 MB state first.
    plan = [("model header", lambda: model_case("model header"), 0.5),
            ("model weights", lambda: model_case("model weights"), 0.1), ("config.json", config_case, 0.2),
            ("state.pt", state_case, 0.08), ("split.csv", split_case, 0.12)]  # fmt: skip
    counts: Counter[str] = Counter()
    outcomes: Counter[tuple[str, int]] = Counter()
    seconds: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for target, make, share in plan:
            deadline = time.monotonic() + SECONDS * share
            while time.monotonic() < deadline:
                argv = make()
                if argv is None:
                    restore()
                    continue
                capsys.readouterr()
                signal.alarm(CASE_SECONDS)
                started = time.monotonic()
                try:
                    code = main(argv)
                except Hang:
                    failures.append(f"{target}: hang > {CASE_SECONDS} s: {argv}")
                    continue
                finally:
                    signal.alarm(0)
                    restore()
                out, err = capsys.readouterr()
                counts[target] += 1
                outcomes[target, code] += 1
                seconds[target, code] += time.monotonic() - started
                errors = [line for line in err.splitlines() if line.startswith("error:")]
                if code not in (0, 1, 2) or "Traceback" in err:
                    failures.append(f"{target}: exit {code}: {err[-500:]}")
                elif code == 2 and (len(errors) != 1 or "(unexpected;" in errors[0]):
                    failures.append(f"{target}: {errors or err[-300:]}")
                elif code == 0 and "--json" in argv and not _strict_json(out):
                    failures.append(f"{target}: exit 0 but not valid JSON (NaN?): {out[:300]}")
                if len(failures) >= 10:
                    break
    finally:
        signal.signal(signal.SIGALRM, previous)
    mean = {f"{t} exit {c}": f"{n} x {seconds[t, c] / n:.3f} s" for (t, c), n in sorted(outcomes.items())}
    print(f"fuzz seed {SEED}: {sum(counts.values())} cases; {mean}")
    assert not failures, "\n".join(failures)
    assert counts["model header"] >= 300 and all(counts[t] >= 1 for t, _, _ in plan), counts
    assert {p.name: _digest(p) for p in run.iterdir() if p.name in pristine} == pristine  # the links were only read
