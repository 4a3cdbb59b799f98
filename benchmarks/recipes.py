"""Recipe search at a small budget: which training settings learn most from 6,000 Fashion-MNIST images in 2 epochs.

Every point is a set of `vgg train` flags, trained with several seeds through the command line exactly as a user
would run it, then scored with `vgg evaluate --json` on 2,000 official test images (200 per class). The budget is
fixed: 6,000 training images (600 per class) and a 1,000-image validation split (100 per class), both drawn with a
fixed seed from the official training folder, 32 px. The draw is made once, as folders of symbolic links.

Each finished run is one line of ``OUT/results.jsonl``; running the script again skips the runs already there, so a
search can be stopped and continued. The table (mean, min-max, standard deviation, seeds, minutes per run) is
printed, and with ``--append`` added to benchmarks/RESULTS.md with date, machine, commit and command. The measured
table is in RESULTS.md, section "Recipe search at a small budget".

Usage:
    python benchmarks/recipes.py --points default bn            # named points (see POINTS), seeds 0 1
    python benchmarks/recipes.py --flags "--lr 5e-4" --name lr5e-4 --seeds 0 1 2
    python benchmarks/recipes.py --table --append               # only the table of what OUT already holds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

SECTION = "Recipe search at a small budget (`benchmarks/recipes.py`)"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}

# Named points: `vgg train` flags on top of the defaults of the code that runs them. The 2026-11-30 search ran the
# first group on the old defaults (commit c5efbb5: plain VGG16, 4-pixel shifts and flips), where "(defaults)" was
# that recipe; "shipped" is the new default recipe (VGG16-BN, flips, no shifts) with no flags.
POINTS: dict[str, str] = {
    "default": "",
    "warmup0.1": "--warmup-epochs 0.1",
    "bn": "--arch vgg16_bn",
    "bn-warmup0.1": "--arch vgg16_bn --warmup-epochs 0.1",
    "bn-sgd-onecycle0.05": "--arch vgg16_bn --optimizer sgd --lr 0.05 --weight-decay 5e-4 --schedule onecycle",
    "bn-bs32": "--arch vgg16_bn --batch-size 32",
    "bn-ema0.99": "--arch vgg16_bn --ema 0.99",
    "bn-noaug": "--arch vgg16_bn --shift 0 --no-hflip",
    "bn-flip": "--arch vgg16_bn --shift 0",
    "flip": "--shift 0",
    "noaug": "--shift 0 --no-hflip",
    "shipped": "",
    # Ran as the defaults of commit 1a9f1a2, whose automatic warm-up was a fifth of the run (0.4 of 2 epochs).
    "warmup0.4": "--warmup-epochs 0.4",
    # Random erasing in the batch augmentation (issue 17, third session).
    "erasing0.25": "--erasing 0.25",
    # Optimizer, peak rate and label smoothing on the shipped defaults (issue 17, fourth session).
    "sgd-onecycle0.05": "--optimizer sgd --lr 0.05 --weight-decay 5e-4 --schedule onecycle",
    "sgd0.05": "--optimizer sgd --lr 0.05 --weight-decay 5e-4",
    "lr2e-3": "--lr 2e-3",
    "lr5e-4": "--lr 5e-4",
    "ls0": "--label-smoothing 0",
    # The shipped defaults again on the code with dense 2x2 px layers (9275080 on), which rounds differently: the
    # baseline the peak-rate and smoothing points of the sixth session are read against.
    "shipped-dense": "",
    # Smaller family members at the same recipe (issue 17, ninth session): VGG11-BN's step costs ~0.55 of VGG16-BN's,
    # so at a fixed time it trains ~1.8x the epochs.
    "vgg11bn": "--arch vgg11_bn",
    "vgg13bn": "--arch vgg13_bn",
}


def commit() -> str:
    """The checked-out commit, with ``+`` when the working tree has uncommitted changes to the package."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip()
    return (head or "?") + ("+" if dirty else "")


def machine() -> str:
    """CPU model, core count and whether it has native bf16 (the speed of these runs depends on it)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    bf16 = " (native bf16)" if "avx512_bf16" in info or "amx_bf16" in info else ""
    return f"{name}{bf16}, {os.cpu_count()} cores"


def class_images(folder: Path) -> dict[str, list[Path]]:
    """Image files of every class folder, sorted by name so that a seeded draw is the same on every machine."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    return {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes}


def link_subset(dest: Path, chosen: dict[str, list[Path]]) -> None:
    for name, files in chosen.items():
        (dest / name).mkdir(parents=True, exist_ok=True)
        for file in files:
            link = dest / name / file.name
            if not link.exists():
                link.symlink_to(file.resolve())


def make_budget(data: Path, dest: Path, per_class: int, val_per_class: int, test_per_class: int, seed: int) -> Path:
    """Folders train/, val/ and test/ of links into ``data``: a fixed, seeded draw (made once, then reused)."""
    done = dest / ".complete"
    if done.is_file():
        return dest
    rng = random.Random(seed)
    train, val, test = {}, {}, {}
    for name, files in class_images(data / "train").items():
        drawn = rng.sample(files, per_class + val_per_class)
        train[name], val[name] = drawn[:per_class], drawn[per_class:]
    for name, files in class_images(data / "test").items():
        test[name] = rng.sample(files, test_per_class)
    for part, chosen in (("train", train), ("val", val), ("test", test)):
        link_subset(dest / part, chosen)
    done.write_text(f"seed {seed}: {per_class}/{val_per_class}/{test_per_class} per class\n")
    return dest


def run_point(name: str, flags: str, seed: int, epochs: int, budget: Path, out: Path, image_size: int) -> dict:
    """Train one point with one seed through the CLI, then evaluate its best model on the test folder."""
    run_dir = out / "runs" / f"{name}-e{epochs}-s{seed}"
    # A run cut short earlier left its folder behind; vgg train refuses to write over another run's files.
    shutil.rmtree(run_dir, ignore_errors=True)
    vgg = [sys.executable, "-m", "vgg"]
    train = vgg + [
        "train", str(budget / "train"), "--val", str(budget / "val"), "--out", str(run_dir),
        "--image-size", str(image_size), "--epochs", str(epochs), "--seed", str(seed),
    ] + shlex.split(flags)  # fmt: skip
    started = time.perf_counter()
    log = run_dir.parent / (run_dir.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        finished = subprocess.run(train, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    row = {
        "name": name, "flags": flags, "seed": seed, "epochs": epochs, "image_size": image_size,
        "train_seconds": round(seconds, 1), "commit": commit(), "date": datetime.date.today().isoformat(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"), "machine": machine(),
    }  # fmt: skip
    if finished.returncode != 0:
        return {**row, "test_accuracy": None, "error": log.read_text().strip().splitlines()[-1:]}
    evaluated = subprocess.run(
        vgg + ["evaluate", str(run_dir / "best.safetensors"), str(budget / "test"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(evaluated.stdout)
    history = (run_dir / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    last = dict(zip(header, history[-1].split(","), strict=True))
    return {
        **row,
        "test_accuracy": result["accuracy"],
        "val_accuracy": float(last["val_accuracy"]),
        "images_per_s": float(last["images_per_s"]),
        "per_class_accuracy": result["per_class_accuracy"],
    }


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict]) -> str:
    """One line per (point, epochs): test accuracy mean, min-max, std over seeds; minutes per run."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["name"], row["epochs"]), []).append(row)
    lines = [
        "| point | flags | epochs | test accuracy (mean) | min-max | std | seeds | failed | min/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, epochs), group in sorted(groups.items(), key=lambda item: (item[0][1], _mean(item[1]))):
        scores = [r["test_accuracy"] for r in group if r["test_accuracy"] is not None]
        failed = len(group) - len(scores)
        minutes = statistics.mean(r["train_seconds"] for r in group) / 60
        flags = f"`{group[0]['flags']}`" if group[0]["flags"] else "(defaults)"
        if scores:
            spread = f"{min(scores):.3f}-{max(scores):.3f}"
            std = f"{statistics.stdev(scores):.3f}" if len(scores) > 1 else "-"
            mean = f"{statistics.mean(scores):.3f}"
        else:
            spread = std = mean = "-"
        lines.append(
            f"| {name} | {flags} | {epochs} | {mean} | {spread} | {std} | {len(scores)} | {failed} | {minutes:.1f} |"
        )
    return "\n".join(lines)


def _mean(group: list[dict]) -> float:
    scores = [r["test_accuracy"] for r in group if r["test_accuracy"] is not None]
    return statistics.mean(scores) if scores else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/fashion-mnist", help="folder with train/<class> and test/<class>")
    parser.add_argument("--out", default="runs/recipes", help="where the subset, the runs and results.jsonl go")
    parser.add_argument("--points", nargs="*", default=[], help=f"named points: {', '.join(POINTS)}")
    parser.add_argument("--flags", help="an ad-hoc point: `vgg train` flags in one string (name it with --name)")
    parser.add_argument("--name", help="the ad-hoc point's name in the table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=600, help="training images per class; default 600")
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--draw-seed", type=int, default=0, help="seed of the subset draw (not of training)")
    parser.add_argument("--table", action="store_true", help="only print the table of the runs already done")
    parser.add_argument("--only", nargs="*", help="with --table: only these point names")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    out = Path(args.out)
    budget = out / f"fashion-mnist-{args.per_class}-{args.val_per_class}-{args.test_per_class}-d{args.draw_seed}"
    results = out / "results.jsonl"
    points = {name: POINTS[name] for name in args.points}
    if args.flags is not None:
        points[args.name or args.flags.replace(" ", "")] = args.flags
    if not args.table:
        make_budget(Path(args.data), budget, args.per_class, args.val_per_class, args.test_per_class, args.draw_seed)
        for name, flags in points.items():
            for seed in args.seeds:
                done = read_results(results)
                if any((r["name"], r["epochs"], r["seed"]) == (name, args.epochs, seed) for r in done):
                    continue
                row = run_point(name, flags, seed, args.epochs, budget, out, args.image_size)
                with open(results, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                score = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else f"failed {row['error']}"
                print(f"{name} seed {seed}: test {score} ({row['train_seconds'] / 60:.1f} min)", flush=True)
    rows = read_results(results)
    if args.only:
        rows = [r for r in rows if r["name"] in args.only]
    text = table(rows)
    print(text)
    if args.append:
        command = "python benchmarks/recipes.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        header = (
            f"\n{datetime.date.today().isoformat()}, {machine()}, commit {commit()}, CPU shared with other jobs "
            f"(minutes are indicative only); {args.per_class * 10} training images, {args.val_per_class * 10} "
            f"validation, {args.test_per_class * 10} official test images, {args.image_size} px; "
            f"test accuracy of best.safetensors. Command: `{command}`\n"
        )
        # bench_speed imports the package; only needed here, and the runs above may use another checkout's.
        from bench_speed import append_to_section

        append_to_section(RESULTS, SECTION, header + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
