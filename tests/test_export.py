"""vgg export: each format, run in its own runtime at batch 1 and 5, equals PyTorch within 1e-4."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vgg import cli
from vgg.checkpoint import ModelInfo, save_model
from vgg.errors import UsageError
from vgg.models import build
from vgg.predict import load

onnx = importlib.import_module("onnx")
ort = importlib.import_module("onnxruntime")

from vgg.export import export, info_from_metadata, read_onnx_metadata  # noqa: E402

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    model = build("vgg11_bn", num_classes=3, image_size=32)
    # Non-trivial batch-norm statistics, so a wrong eval/train mode in the export would show.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    # A fitted temperature other than 1, so the export must divide the logits by it as `vgg predict` does.
    save_model(path, model, ModelInfo("vgg11_bn", CLASSES, 32, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], temperature=1.7))
    return path


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def _reference(model_file: Path, images: torch.Tensor) -> np.ndarray:
    return load(model_file, device="cpu", precision="fp32").probabilities(images).numpy()


def test_onnx_in_onnxruntime_equals_pytorch_at_batch_1_and_5(model_file, tmp_path):
    out = tmp_path / "model.onnx"
    result = export(model_file, "onnx", out=out)
    assert result.ok and set(result.max_abs_diff) == {1, 5}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # a symbolic, not a fixed, batch dimension
    for n in (1, 5):
        images = _images(n)
        got = session.run(None, {"image": images.float().div(255).numpy()})[0]
        assert got.shape == (n, 3)
        assert np.abs(got - _reference(model_file, images)).max() <= 1e-4
    meta = read_onnx_metadata(out)
    assert meta["class_names"] == CLASSES and meta["image_size"] == 32
    assert meta["preprocessing"]["mean"] == pytest.approx([0.5, 0.4, 0.3])
    assert info_from_metadata(meta).class_names == CLASSES


def test_torchscript_equals_pytorch_and_has_metadata_beside(model_file, tmp_path):
    out = tmp_path / "model.torchscript.pt"
    result = export(model_file, "torchscript", out=out)
    assert result.ok and result.metadata_path == tmp_path / "model.torchscript.pt.json"
    assert json.loads(result.metadata_path.read_text())["class_names"] == CLASSES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(out))
    for n in (1, 5):
        images = _images(n)
        with torch.no_grad():
            got = module(images.float().div(255)).numpy()
        assert np.abs(got - _reference(model_file, images)).max() <= 1e-4


def test_exported_program_equals_pytorch(model_file, tmp_path):
    result = export(model_file, "exported-program", out=tmp_path / "model.pt2")
    assert result.ok and json.loads(result.metadata_path.read_text())["output"]["meaning"] == "softmax"
    module = torch.export.load(str(tmp_path / "model.pt2")).module()
    for n in (1, 5):
        images = _images(n)
        with torch.no_grad():
            got = module(images.float().div(255)).numpy()
        assert np.abs(got - _reference(model_file, images)).max() <= 1e-4


def test_default_output_path_is_beside_the_model(model_file):
    result = export(model_file, "exported-program")
    assert result.path == model_file.with_name("tiny.pt2") and result.path.is_file()
    assert "OK" in result.summary()


def test_cli_export_prints_the_check(model_file, tmp_path, capsys):
    out = tmp_path / "cli.pt2"
    assert cli.main(["export", str(model_file), "--format", "exported-program", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "batch 5" in printed and printed.rstrip().endswith("OK")
    assert cli.main(["export", str(model_file), "--format", "keras"]) == 2


def test_an_out_that_is_a_folder_is_refused_before_the_export(model_file, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    assert cli.main(["export", str(model_file), "--format", "onnx", "--out", str(folder)]) == 2
    assert f"error: --out {folder} is a folder: expected a file name for the onnx export" in capsys.readouterr().err
    assert list(folder.iterdir()) == []  # no temp file left behind either


def test_unknown_format_and_misplaced_opset_are_usage_errors(model_file):
    with pytest.raises(UsageError, match="format must be one of onnx, torchscript, exported-program"):
        export(model_file, "tflite")
    with pytest.raises(UsageError, match="--opset applies to ONNX only"):
        export(model_file, "torchscript", opset=17)


def test_onnx_without_metadata_is_refused(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(UsageError, match="no 'vgg' metadata"):
        read_onnx_metadata(tmp_path / "plain.onnx")
