from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import struct
import threading
import urllib.request
from collections.abc import Iterator
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


def _content_sha256(folder: Path) -> dict[str, tuple[str, int]]:
    """What ``FASHION_MNIST_SHA256`` would say of the files in ``folder`` (hash and size of the gunzipped content)."""
    out = {}
    for path in folder.iterdir():
        data = gzip.decompress(path.read_bytes())
        out[path.name] = (hashlib.sha256(data).hexdigest(), len(data))
    return out


@contextlib.contextmanager
def serving(folder: Path, monkeypatch, tmp_path: Path) -> Iterator[None]:
    """``folder`` served over HTTP on the loopback as the download address; no Debian copy; a fresh home."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
    monkeypatch.setattr(datasets, "FASHION_MNIST_URL", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # urlopen keeps the opener (and the proxies) of its first call in the process, which may have been another
    # test's closed proxy port: start from a fresh one, built from the environment above.
    urllib.request.install_opener(None)
    try:
        yield
    finally:
        server.shutdown()


def test_download_when_no_local_copy(tmp_path: Path, monkeypatch):
    """Nothing in Debian's folder: the files come over HTTP (a loopback server here) into the user's cache."""
    served = fake_fashion_mnist(tmp_path / "served")
    monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", _content_sha256(served))
    with serving(served, monkeypatch, tmp_path):
        dest = datasets.fashion_mnist(tmp_path / "fm")
    assert len(list((dest / "test").rglob("*.png"))) == 20
    assert (tmp_path / "home" / ".cache" / "vgg" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_download_with_the_wrong_checksum_is_refused_and_not_kept(tmp_path: Path, monkeypatch):
    served = fake_fashion_mnist(tmp_path / "served")
    expected = _content_sha256(served)
    expected["t10k-labels-idx1-ubyte.gz"] = ("0" * 64, expected["t10k-labels-idx1-ubyte.gz"][1])
    monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", expected)
    with (
        serving(served, monkeypatch, tmp_path),
        pytest.raises(
            UsageError,
            match=r"does not have the SHA-256 of Fashion-MNIST's t10k-labels-idx1-ubyte.gz: refused and deleted",
        ),
    ):
        datasets.fashion_mnist(tmp_path / "fm")
    cache = tmp_path / "home" / ".cache" / "vgg" / "fashion-mnist"
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists() and not list(cache.glob("*.part"))
    assert not (tmp_path / "fm").exists()


def test_a_damaged_cached_file_is_downloaded_again(tmp_path: Path, monkeypatch):
    served = fake_fashion_mnist(tmp_path / "served")
    monkeypatch.setattr(datasets, "FASHION_MNIST_SHA256", _content_sha256(served))
    cache = tmp_path / "home" / ".cache" / "vgg" / "fashion-mnist"
    fake_fashion_mnist(cache)
    write_idx(cache / "train-labels-idx1-ubyte.gz", np.arange(30) % 3)  # same shape, other labels: tampered
    with serving(served, monkeypatch, tmp_path):
        dest = datasets.fashion_mnist(tmp_path / "fm")
    assert (cache / "train-labels-idx1-ubyte.gz").read_bytes() == (served / "train-labels-idx1-ubyte.gz").read_bytes()
    assert len(list((dest / "train" / "bag").iterdir())) == 3  # labels 8: indices 8, 18, 28


def test_downloads_are_https_and_bounded(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_URL", "http://example.com/")
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(
        UsageError, match=r"Refusing to download http://example.com/train-images-idx3-ubyte.gz: expected an https"
    ):
        datasets.fashion_mnist(tmp_path / "fm")
    served = fake_fashion_mnist(tmp_path / "served")
    monkeypatch.setattr(datasets, "MAX_DOWNLOAD_BYTES", 100)
    with serving(served, monkeypatch, tmp_path), pytest.raises(UsageError, match=r"passed 100 bytes: refused"):
        datasets.fashion_mnist(tmp_path / "fm")


def test_bad_idx_content_is_one_line(tmp_path: Path):
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UsageError, match=r"Cannot read IDX file .*plain.gz"):
        datasets.read_idx(tmp_path / "plain.gz")
    corrupt = bytearray(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(200)))
    corrupt[12:20] = b"\xff" * 8
    (tmp_path / "corrupt.gz").write_bytes(bytes(corrupt))
    with pytest.raises(UsageError, match=r"Cannot read IDX file .*corrupt.gz"):
        datasets.read_idx(tmp_path / "corrupt.gz")
    (tmp_path / "dims").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(UsageError, match=r"dims is not an IDX file: its header names 3 dimensions in 6 bytes"):
        datasets.read_idx(tmp_path / "dims")


def test_no_local_copy_and_no_network_is_one_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN", tmp_path / "no-debian")
    monkeypatch.setattr(datasets, "FASHION_MNIST_URL", "http://127.0.0.1:9/")  # discard port: refused at once
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UsageError, match=r"Fashion-MNIST not found in .*no-debian and the download failed .*apt-get"):
        datasets.fashion_mnist(tmp_path / "fm")
