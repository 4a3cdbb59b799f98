from __future__ import annotations

import functools
import gzip
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from vgg import datasets
from vgg.errors import UsageError


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder: Path, train: int = 30, test: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def test_idx_round_trip_and_errors(tmp_path: Path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(datasets.read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(UsageError, match=r"bad is not an IDX file of unsigned bytes \(magic 12345678"):
        datasets.read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(UsageError, match=r"short.gz is truncated: header says \(10,\), found 3 values"):
        datasets.read_idx(tmp_path / "short.gz")


def test_limit_per_class_and_refusal_to_overwrite(tmp_path: Path):
    source = fake_fashion_mnist(tmp_path / "idx")
    dest = datasets.fashion_mnist(tmp_path / "fm", source, limit_per_class=1)
    assert len(list((dest / "train").rglob("*.png"))) == 10
    other = tmp_path / "busy"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match=r"busy exists and is not a finished Fashion-MNIST export"):
        datasets.fashion_mnist(other, source)
    assert (other / "mine.txt").read_text() == "keep me"


def test_download_when_no_local_copy(tmp_path: Path, monkeypatch):
    """Nothing in Debian's folder: the files come over HTTP (a loopback server here) into the user's cache."""
    served = fake_fashion_mnist(tmp_path / "served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
        monkeypatch.setattr(datasets, "FASHION_MNIST_URL", f"http://127.0.0.1:{server.server_port}/")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        dest = datasets.fashion_mnist(tmp_path / "fm")
    finally:
        server.shutdown()
    assert len(list((dest / "test").rglob("*.png"))) == 20
    assert (tmp_path / "home" / ".cache" / "vgg" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_no_local_copy_and_no_network_is_one_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
    monkeypatch.setattr(datasets, "FASHION_MNIST_URL", "http://127.0.0.1:9/")  # discard port: refused at once
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UsageError, match=r"Fashion-MNIST not found in .*no-debian and the download failed .*apt-get"):
        datasets.fashion_mnist(tmp_path / "fm")
