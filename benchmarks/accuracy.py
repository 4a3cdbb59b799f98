"""Accuracy on real data: train on Fashion-MNIST with `vgg`'s recipe, evaluate on the official test set.

Appends a row to RESULTS.md: commit, arch, recipe, epochs, training time, time to 0.94 validation accuracy,
machine, test accuracy (also with flip test-time augmentation, `vgg evaluate --tta`) and per-class accuracy; writes
the confusion matrix to RUN_DIR/confusion.csv. Run it again after an interruption and it resumes the run in RUN_DIR.

Usage: python benchmarks/accuracy.py [--arch vgg16] [--recipe default] [--epochs 15] [--out runs/accuracy-vgg16]
       [-- extra `vgg train` flags]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
from pathlib import Path

from bench_speed import RESULTS, append_to_section, commit, machine

from vgg.cli import build_parser
from vgg.datasets import fashion_mnist
from vgg.predict import load
from vgg.training.flags import train_config
from vgg.training.run import train

ACCURACY_SECTION = "Accuracy on Fashion-MNIST (`make accuracy`)"


def time_to(history: list[dict[str, float]], target: float) -> float | None:
    """Training seconds until the run's model first reached ``target`` validation accuracy (None if it never did).

    With ``--ema`` the run's model of an epoch is the one its history row names (the trained or the averaged
    weights, whichever the run kept), so that one's validation counts.
    """
    elapsed = 0.0
    for row in history:
        elapsed += row["seconds"]
        if row["ema_val_accuracy" if row.get("model_is_average") else "val_accuracy"] >= target:
            return elapsed
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--out")
    parser.add_argument("--target", type=float, default=0.94)
    parser.add_argument("--no-append", action="store_true")
    args, extra = parser.parse_known_args()
    out = args.out or f"runs/accuracy-{args.arch}-{args.recipe}"
    data = fashion_mnist(args.data)

    if (Path(out) / "state.pt").is_file():
        # An interrupted run continues where it stopped (same settings, from its config.json).
        argv = ["train", "--resume", out, "--epochs", str(args.epochs)]
    else:
        argv = [
            "train", str(data / "train"), "--out", out, "--recipe", args.recipe, "--arch", args.arch,
            "--epochs", str(args.epochs), "--image-size", str(args.image_size),
            "--val-fraction", str(args.val_fraction), "--patience", "0",
            *[a for a in extra if a != "--"],
        ]  # fmt: skip
    parsed = build_parser().parse_args(argv)
    config = train_config(parsed)
    result = train(config, log=print, progress=sys.stderr.isatty(), resume=bool(parsed.resume))
    # Training time summed over epochs, so a resumed run counts each epoch once.
    wall = sum(row["seconds"] for row in result.history)
    classifier = load(result.best_model)
    test = classifier.evaluate(data / "test", batch_size=256)
    # The same model with flip test-time augmentation (vgg evaluate --tta), reported beside the plain number.
    tta = load(result.best_model, tta=True).evaluate(data / "test", batch_size=256)
    with open(Path(out) / "confusion.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *test["class_names"]])
        for name, row in zip(test["class_names"], test["confusion"], strict=True):
            writer.writerow([name, *row])
    reached = time_to(result.history, args.target)
    per_class = ", ".join(f"{n} {a:.3f}" for n, a in zip(test["class_names"], test["per_class_accuracy"], strict=True))
    row = (
        f"| {datetime.date.today()} | {commit()} | {args.arch} | {args.recipe} {' '.join(extra)} | "
        f"{len(result.history)} | {wall / 60:.1f} min | "
        f"{f'{reached / 60:.1f} min' if reached else 'not reached'} | {machine()} | "
        f"{test['accuracy']:.4f} (--tta {tta['accuracy']:.4f}) | {per_class} |"
    )
    print(
        f"test accuracy {test['accuracy']:.4f}, with --tta {tta['accuracy']:.4f} (best epoch {result.fit.best_epoch}); "
        f"confusion: {out}/confusion.csv"
    )
    print(row)
    if not args.no_append:
        append_to_section(RESULTS, ACCURACY_SECTION, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
