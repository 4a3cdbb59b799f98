"""The ``vgg`` command line: each subcommand maps onto one API call; errors are one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2, like ours
        raise UsageError(f"{self.prog}: {message}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}")
    return value


def _add_summary(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("summary", help="print a model's layers, output shapes and parameter counts")
    p.add_argument("--arch", default="vgg16", help="family member (vgg11 ... vgg19_bn); default vgg16")
    p.add_argument("--classes", type=int, default=1000, help="number of output classes; default 1000")
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels; default 224")
    p.add_argument("--freeze", choices=["none", "features"], default="none",
                   help="features: count the trunk as non-trainable (as `vgg train --freeze features`)")  # fmt: skip
    p.set_defaults(run=_summary)


def _summary(args: argparse.Namespace) -> int:
    from .models import check_arch
    from .report import format_summary

    print(format_summary(check_arch(args.arch), args.classes, args.image_size, args.freeze), end="")
    return 0


def _add_train(commands: argparse._SubParsersAction, flags: bool = True) -> None:
    """``vgg train``; its setting flags come from the config declarations (``training/flags.py``).

    ``flags=False`` registers the command alone, so that other commands never import the training package.
    """
    p = commands.add_parser("train", help="train a model on a class-per-folder image dataset")
    p.set_defaults(run=_train)
    if not flags:
        return
    from .training.flags import add_settings

    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its state.pt, exactly")
    add_settings(p)


def _add_lr_find(commands: argparse._SubParsersAction, flags: bool = True) -> None:
    """``vgg lr-find DATA [train flags]``: the learning-rate range test for the run those flags describe."""
    p = commands.add_parser(
        "lr-find", help="learning-rate range test: loss against an exponentially rising rate; suggests a rate"
    )
    p.set_defaults(run=_lr_find, resume=None)
    if not flags:
        return
    g = p.add_argument_group("range test")
    g.add_argument("--start", type=float, default=1e-7, help="first learning rate; default 1e-7")
    g.add_argument("--end", type=float, default=1.0, help="last learning rate (unless the loss diverges); default 1")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps (one batch each); default 200")
    g.add_argument("--plot", default="lr-find.png", help="where to draw the loss curve (PNG); default lr-find.png")
    g.add_argument("--json", action="store_true", help="print the rates, losses and suggestion as JSON")
    from .training.flags import add_settings

    add_settings(p)


def _lr_find(args: argparse.Namespace) -> int:
    from .files import check_out_file
    from .training.flags import train_config
    from .training.lr_find import describe, plot
    from .training.run import lr_find

    check_out_file(args.plot, "the loss curve (PNG)", "--plot")
    config = train_config(args)
    log = (lambda _: None) if args.json else print
    result = lr_find(config, args.start, args.end, args.steps, log=log, progress=sys.stderr.isatty())
    plot(args.plot, result)
    if args.json:
        print(json.dumps({**result.as_dict(), "plot": args.plot}, indent=2))
    else:
        print(describe(result))
        print(f"plot: {args.plot}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .distributed import from_env
    from .training.flags import train_config
    from .training.run import train

    config = train_config(args)
    result = train(config, log=print, progress=sys.stderr.isatty(), resume=bool(args.resume))
    if from_env().main:
        print(
            f"run folder: {result.run_dir} (best.safetensors, last.safetensors, history.csv, curves.png, config.json)"
        )
    return 0


def _add_tta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        action="store_true",
        help="also classify each image mirrored left-right and average the two (twice the compute; only where "
        "mirroring keeps the class)",
    )


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 where the hardware runs it natively, else fp32; fp32 gives a Keras model's exact answers",
    )


def _add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("predict", help="predict the class of images with a trained model")
    p.add_argument(
        "model",
        help="a .safetensors model file written by `vgg train`, imagenet:ARCH (e.g. vgg16), "
        "or a Keras VGG .h5/.keras file",
    )
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--top-k", type=int, default=1, help="show the k most likely classes; default 1")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--csv", action="store_true", help="print CSV (image, label, probability, then the top k)")
    p.add_argument("--threshold", type=float, metavar="P",
                   help="answer 'unknown' for an image whose top (calibrated) probability is below P")  # fmt: skip
    p.add_argument("--device", default="auto")
    _add_precision(p)
    _add_tta(p)
    p.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> int:
    from .predict import expand_images, load

    if args.json and args.csv:
        raise UsageError("--json and --csv both choose the output format: pass one.")
    paths = expand_images(args.images)
    classifier = load(args.model, device=args.device, precision=args.precision, tta=args.tta)
    quiet = args.json or args.csv
    predictions = classifier.predict_files(
        paths, top_k=args.top_k, threshold=args.threshold, progress=not quiet and sys.stderr.isatty()
    )
    failed = [p for p in predictions if p.error]
    if args.json:  # a bad file is an {"image", "error"} entry in its place
        print(json.dumps([p.as_dict() for p in predictions], indent=2))
        return 1 if failed else 0
    for p in failed:
        print(f"error: {p.source}: {p.error}", file=sys.stderr)
    predictions = [p for p in predictions if not p.error]
    if args.csv:
        import csv

        k = min(args.top_k, len(classifier.class_names))
        writer = csv.writer(sys.stdout, lineterminator="\n")
        ranks = [f"top{i}_{column}" for i in range(1, k + 1) for column in ("label", "probability")]
        writer.writerow(["image", "label", "probability", *ranks])
        for p in predictions:
            ranked = [value for label, prob in p.top_k for value in (label, f"{prob:.6f}")]
            writer.writerow([p.source, p.label, f"{p.probability:.6f}", *ranked])
        return 1 if failed else 0
    for p in predictions:
        ranked = "  ".join(f"{label} {prob:.3f}" for label, prob in p.top_k)
        # below --threshold: the answer is "unknown", the ranking follows as the reason
        print(f"{p.source}: {ranked}" if p.label == p.top_k[0][0] else f"{p.source}: {p.label} ({ranked})")
    return 1 if failed else 0


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="accuracy, precision/recall/F1, calibration, confusion on labelled images")
    p.add_argument(
        "model",
        help="a .safetensors model file written by `vgg train`, imagenet:ARCH (e.g. vgg16), "
        "or a Keras VGG .h5/.keras file",
    )
    p.add_argument("data", help="labelled folder DATA/<class>/<image> with the model's classes")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass; default 64")
    p.add_argument("--out", metavar="DIR", help="write confusion.png, confusion.csv, misclassified.csv, metrics.json")
    p.add_argument("--device", default="auto")
    _add_precision(p)
    _add_tta(p)
    p.set_defaults(run=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .predict import load
    from .report import format_evaluation

    classifier = load(args.model, device=args.device, precision=args.precision, tta=args.tta)
    result = classifier.evaluate(args.data, batch_size=args.batch_size, progress=not args.json and sys.stderr.isatty())
    written = []
    if args.out:
        from .evaluation import write_outputs

        written = write_outputs(result, args.out)
    if args.json:  # bad files are in "skipped", with their reasons
        print(json.dumps(result, indent=2))
    else:
        print(format_evaluation(result, classifier.class_names))
        if written:
            print(f"wrote {', '.join(str(p) for p in written)}")
        for bad in result["skipped"]:
            print(f"error: {bad['path']}: {bad['reason']}", file=sys.stderr)
    return 1 if result["skipped"] else 0


def _add_explain(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("explain", help="Grad-CAM: where in each image the evidence for its class lies (PNG)")
    p.add_argument("model", help="a .safetensors model file written by `vgg train`, or imagenet:ARCH")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="explain this class (default: the predicted one)")
    p.add_argument("--out", default="explain", metavar="DIR", help="folder for the overlays; default ./explain")
    p.add_argument("--layer", help="convolution to explain at: a name (features.28) or a count (-1: the last); "
                   "default: the last one whose map is at least 8x8 px")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_explain)


def _explain(args: argparse.Namespace) -> int:
    from .files import check_out_folder
    from .predict import expand_images, load

    paths = expand_images(args.images)
    out = check_out_folder(args.out, "the overlays")
    classifier = load(args.model, device=args.device)
    explanations = (
        explanation
        for start in range(0, len(paths), 32)  # a backward pass per chunk: memory stays that of 32 images
        for explanation in classifier.explain(paths[start : start + 32], class_name=args.class_name, layer=args.layer)
    )
    for index, (path, explanation) in enumerate(zip(paths, explanations, strict=True)):
        target = out / f"{index:04d}-{path.stem}-{explanation.class_name}.png"
        explanation.save(target)
        print(
            f"{path}: predicted {explanation.label} {explanation.label_probability:.3f}; Grad-CAM of "
            f"{explanation.class_name} ({explanation.probability:.3f}) -> {target}"
        )
    return 0


def _add_report(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("report", help="write RUN_DIR/report.html: config, data, curves, metrics, mistakes")
    p.add_argument("run_dir", help="a run folder written by `vgg train`")
    p.add_argument("--data", help="labelled folder to evaluate on (default: the run's validation images)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_report)


def _report(args: argparse.Namespace) -> int:
    from .html_report import write_report

    path = write_report(args.run_dir, data=args.data, device=args.device, progress=sys.stderr.isatty())
    print(f"wrote {path}")
    return 0


def _add_datasets(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("datasets", help="write a real dataset as class folders")
    p.add_argument("name", choices=["fashion-mnist"], help="dataset to write")
    p.add_argument("dest", help="output folder: DEST/train/<class>/*.png and DEST/test/<class>/*.png")
    p.add_argument("--source", help="folder holding the IDX files (default: Debian's package, then download)")
    p.add_argument("--limit-per-class", type=int, help="write at most this many images per class and split")
    p.set_defaults(run=_datasets)


def _datasets(args: argparse.Namespace) -> int:
    from .datasets import fashion_mnist

    dest = fashion_mnist(args.dest, args.source, args.limit_per_class, progress=sys.stderr.isatty())
    print(f"wrote Fashion-MNIST to {dest}/train and {dest}/test")
    return 0


def _add_doctor(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("doctor", help="check a dataset folder before training: counts, bad files, duplicates")
    p.add_argument("data", help="dataset folder: DATA/<class>/<image>")
    p.add_argument("--val", help="validation folder: also checked for images duplicated across train and val")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import examine, format_report

    report = examine(args.data, args.val, progress=not args.json and sys.stderr.isatty())
    print(json.dumps(report, indent=2) if args.json else format_report(report), end="" if not args.json else "\n")
    return 1 if report["problems"] else 0


def _add_import_keras(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("import-keras", help="convert a Keras VGG (.h5, .weights.h5, .keras) to a vgg model file")
    p.add_argument("file", help="a Keras VGG16/VGG19 model or weights file (nothing in it is executed)")
    p.add_argument("--classes", help="class names in output order, comma-separated (default: class_indices.json "
                   "beside the file, else class_0, class_1, ...)")  # fmt: skip
    p.add_argument("--out", help="model file to write; default: FILE with the suffix .safetensors")
    p.add_argument("--preprocessing", choices=["auto", "raw", "caffe"], default="auto",
                   help="what the Keras model was fed: raw 0-255 RGB (the tutorial) or caffe (keras.applications' "
                   "preprocess_input); auto: caffe for keras.applications' layer names, else raw")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(run=_import_keras)


def _import_keras(args: argparse.Namespace) -> int:
    from .keras_import import import_keras

    classes = [name.strip() for name in args.classes.split(",")] if args.classes else None
    out, info = import_keras(args.file, args.out, classes, args.preprocessing, overwrite=args.force)
    print(f"wrote {out}: {info.extra['imported_from']}; classes: {', '.join(info.class_names)}")
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="export a model to ONNX, TorchScript or a torch.export program")
    p.add_argument("model", help="a .safetensors model file written by `vgg train`, or imagenet:ARCH (e.g. vgg16)")
    p.add_argument("--format", required=True, help="onnx, torchscript or exported-program")
    p.add_argument("--out", help="file to write (default: beside the model, .onnx / .torchscript.pt / .pt2)")
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    p.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from .export import export

    result = export(args.model, args.format, out=args.out, opset=args.opset)
    print(result.summary())
    return 0 if result.ok else 1


def _add_serve(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="serve a model over HTTP (POST /predict) with a web page to try it")
    p.add_argument("model", help="a .safetensors model file, imagenet:ARCH, or an .onnx file from `vgg export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="image decoding processes; default 2")
    p.add_argument("--max-batch", type=int, default=32, help="most images per model call; default 32")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill; default 5")
    p.add_argument("--backend", default="auto", help="torch, onnxruntime or auto (onnxruntime on CPU, torch on CUDA)")
    p.add_argument("--device", default="auto", help="torch backend: auto, cpu, cuda or cuda:N")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or set $VGG_SERVE_TOKEN: ps shows no env)")
    p.add_argument("--cors-origin", help="allow browser pages from this origin (default: none)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image unless ?top_k= says; default 5")
    p.add_argument("--rate-limit", type=int, default=600, help="requests per client per minute; 0: none")
    p.add_argument("--max-body-mb", type=_positive_number, default=20.0, help="largest request body; default 20 MB")
    p.add_argument("--max-files", type=int, default=16, help="most images per request; default 16")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (w x h); default 40 Mpx")
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from .decode_pool import Limits
    from .serve import ServeConfig, serve

    serve(
        ServeConfig(
            model=args.model,
            host=args.host,
            port=args.port,
            workers=args.workers,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            backend=args.backend,
            device=args.device,
            token=args.token,
            cors_origin=args.cors_origin,
            top_k=args.top_k,
            rate_limit=args.rate_limit,
            max_body_bytes=int(args.max_body_mb * 1024**2),
            max_files=args.max_files,
            limits=Limits(max_pixels=args.max_pixels),
        )
    )
    return 0


def build_parser(train_flags: bool = True) -> argparse.ArgumentParser:
    """The ``vgg`` parser; ``train_flags=False`` leaves out ``vgg train``'s settings (and the training import)."""
    parser = _Parser(prog="vgg", description="Train, evaluate and use VGG image classifiers on folders of images.")
    parser.add_argument("--version", action="version", version=f"vgg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_summary(commands)
    _add_train(commands, train_flags)
    _add_lr_find(commands, train_flags)
    for add in (_add_predict, _add_evaluate, _add_explain, _add_report, _add_datasets, _add_doctor, _add_import_keras):
        add(commands)
    _add_export(commands)
    _add_serve(commands)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _quiet_stdout() -> None:
    """Point stdout at /dev/null after a broken pipe, so the interpreter's last flush does not fail again (as the
    Python documentation on SIGPIPE recommends)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    0: done; 1: done, with problems found (``doctor``) or inputs that failed; 2: bad input or any other error, as
    one ``error:`` line on stderr (``--debug`` shows the traceback); 130: interrupted; 141: the reader of stdout
    went away (``| head``), quietly.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    debug = "--debug" in (argv[: argv.index(command)] if command is not None else argv)
    try:
        args = build_parser(train_flags=command in ("train", "lr-find")).parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
        code = args.run(args)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's exit
        return code
    except UsageError as error:
        if debug:
            raise
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except OSError as error:  # the file system said no: no permission, a file where a folder belongs, a full disk
        if debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{_one_line(error.strerror or str(error))}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug or an input nothing above anticipated: still one line, never a traceback
        if debug:
            raise
        print(
            f"error: {_one_line(f'{type(error).__name__}: {error}')} (unexpected; `vgg --debug ...` shows where)",
            file=sys.stderr,
        )
        return 2
