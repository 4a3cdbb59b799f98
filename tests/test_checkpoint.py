from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vgg.checkpoint import ModelInfo, load_model, read_info, save_model
from vgg.errors import UsageError
from vgg.files import atomic_write
from vgg.models import build


def _info(classes=("cat", "dog")) -> ModelInfo:
    return ModelInfo("vgg11", list(classes), 32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


def test_round_trip_keeps_weights_and_metadata(tmp_path: Path):
    model = build("vgg11", num_classes=2, image_size=32).eval()
    save_model(tmp_path / "m.safetensors", model, _info())
    loaded, info = load_model(tmp_path / "m.safetensors")
    assert info == _info()
    assert read_info(tmp_path / "m.safetensors").class_names == ["cat", "dog"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_safetensors_without_our_metadata_is_refused(tmp_path: Path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UsageError, match=r"other.safetensors is a safetensors file but not a vgg model"):
        load_model(path)


def test_random_bytes_and_missing_files_are_refused(tmp_path: Path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a model at all")
    with pytest.raises(UsageError, match=r"junk.safetensors is not a vgg model file"):
        load_model(junk)
    with pytest.raises(UsageError, match=r"Model file not found: .*nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")


class _Exploit:
    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_a_pickle_is_never_executed(tmp_path: Path):
    exploit = _Exploit()
    exploit.target = str(tmp_path / "pwned.txt")
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(exploit))
    with pytest.raises(UsageError, match="not a vgg model file"):
        load_model(evil)
    assert not (tmp_path / "pwned.txt").exists()


def test_failed_write_leaves_the_previous_file_intact(tmp_path: Path):
    target = tmp_path / "best.safetensors"
    target.write_text("previous")

    def crash(temp: str) -> None:
        Path(temp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_atomic_write_over_a_folder_names_the_folder_and_writes_nothing(tmp_path: Path):
    target = tmp_path / "best.safetensors"
    target.mkdir()
    calls = []
    with pytest.raises(UsageError, match=f"^{target} is a folder: expected a file name for the file to write"):
        atomic_write(target, calls.append)
    assert calls == [] and list(tmp_path.iterdir()) == [target] and target.is_dir()


def _real_files(run: Path) -> dict[str, Path]:
    """Files users give where the model belongs, made the way their tools make them."""
    files = {"png": run / "cat.png", "jpg": run / "cat.JPG", "pth": run / "model.pth", "json": run / "config.json"}
    Image.new("RGB", (8, 8)).save(files["png"])
    Image.new("RGB", (8, 8)).save(files["jpg"], format="JPEG")
    torch.save({"w": torch.zeros(2)}, files["pth"])
    files["json"].write_text('{"config": {}}')
    files["h5"] = run / "vgg16.h5"
    files["h5"].write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))  # the HDF5 signature, as Keras files begin
    files["onnx"] = run / "model.onnx"
    files["onnx"].write_bytes(b"\x08\x08\x12\x07pytorch")  # protobuf: no signature, the name tells
    return files


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("png", r"it is an image: the model file comes first on the command line"),
        ("jpg", r"it is an image: the model file comes first on the command line"),
        ("h5", r"it is a Keras file: convert it with `vgg import-keras .*vgg16.h5`"),
        ("pth", r"it is a PyTorch file \(torch.save\), which vgg never loads as a model: loading one can run code; "
         r"did you mean .*best.safetensors\?"),
        ("onnx", r"it is an ONNX file: give the .safetensors model it was exported from"),
        ("json", r"it is a JSON file; did you mean .*best.safetensors\?"),
    ],
)  # fmt: skip
def test_a_file_of_another_kind_given_as_the_model_is_named_with_what_to_do(tmp_path: Path, kind: str, says: str):
    run = tmp_path / "run"
    run.mkdir()
    save_model(run / "best.safetensors", build("vgg11", num_classes=2, image_size=32), _info())
    with pytest.raises(UsageError, match=rf"is not a vgg model file \({says}\)\. Expected a .safetensors file"):
        load_model(_real_files(run)[kind])
