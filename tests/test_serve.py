"""vgg serve as a user runs it: a real subprocess on a free loopback port, called over HTTP (and from a browser)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _png_claiming, crashing_png
from PIL import Image

from vgg import cli
from vgg.checkpoint import ModelInfo, save_model
from vgg.decode_pool import DecoderCrashed, DecoderPool, Limits, decode_for_model
from vgg.models import build
from vgg.runtime import pick_precision

importlib.import_module("fastapi")
importlib.import_module("uvicorn")

CLASSES = ["cat", "dog", "fox"]
TOKEN = "s3cret-token"
ORIGIN = "http://allowed.example"
# `vgg predict` runs in bf16 on CPUs with native bf16, else fp32. The torch backend runs as it does (only the batch
# around an image differs, which moves bf16 rounding by <1e-3); onnxruntime runs fp32, which differs from bf16 by
# bf16's rounding (~1e-2) and from fp32 by ~1e-7.
BF16 = pick_precision("auto", torch.device("cpu")) == "bf16"
TOLERANCE = {"torch": 2e-3, "onnxruntime": 2e-2 if BF16 else 1e-5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Path, *args: str, env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    port = _free_port()
    # The onnxruntime backend caches its export of the model there: a temp folder, not the user's ~/.cache.
    env = {"VGG_CACHE_DIR": str(model.parent / "cache"), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vgg", "serve", str(model), "--port", str(port), "--workers", "1", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # the first start exports to ONNX; this machine may be busy
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stdout.read().decode(errors='replace')}")
            with contextlib.suppress(OSError):
                if _get(url + "/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("server did not become healthy in 300 s")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        try:
            connection.request(
                method or ("POST" if data is not None else "GET"),
                parts.path + (f"?{parts.query}" if parts.query else ""),
                body=data,
                headers=headers or {},
            )
        except (BrokenPipeError, ConnectionResetError):
            pass  # a server may answer (413) and close before a too-large body is all sent: read its answer
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


def _get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    status, _, body = _request(url, headers=headers)
    return status, (json.loads(body) if body.startswith(b"{") else {"text": body.decode()})


def _post_image(url: str, data: bytes, content_type: str = "image/png", headers: dict | None = None):
    status, _, body = _request(url + "/predict", data, {"Content-Type": content_type, **(headers or {})})
    return status, json.loads(body)


def _post_files(url: str, files: list[tuple[str, bytes]], query: str = "", headers: dict | None = None):
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    status, _, out = _request(url + "/predict" + query, body, {"Content-Type": content_type, **(headers or {})})
    return status, json.loads(out)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _gif(frames: int) -> bytes:
    images = [Image.new("RGB", (4, 4), (2 * i % 256, 255 - i, 0)) for i in range(frames)]  # distinct: kept
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=10)
    return out.getvalue()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Images of different sizes and kinds, as a user would send them."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in (("red.png", (40, 50)), ("noise.jpg", (64, 48)), ("grey.png", (20, 33))):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        if name == "red.png":
            pixels[..., 0] = 230
        image = Image.fromarray(pixels)
        if name == "grey.png":
            image = image.convert("L")
        image.save(folder / name)
        paths[name] = folder / name
    return paths


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(
        path, build("vgg11", num_classes=3, image_size=32), ModelInfo("vgg11", CLASSES, 32, [0.5] * 3, [0.25] * 3)
    )
    return path


@pytest.fixture(scope="module")
def server(model_file) -> Iterator[tuple[str, subprocess.Popen]]:
    args = ["--rate-limit", "0", "--max-files", "4", "--max-body-mb", "1", "--max-pixels", "1000000"]
    with running_server(model_file, *args, "--max-wait-ms", "30") as running:
        yield running


def _vgg_predict_json(model: Path, paths: list[Path], capsys) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["predict", str(model), *map(str, paths), "--json", "--top-k", "3"]) == 0
    return json.loads(capsys.readouterr().out)


def _same(served: dict, expected: dict, tolerance: float) -> None:
    assert served["label"] == expected["label"]
    assert [t["label"] for t in served["top_k"]] == [t["label"] for t in expected["top_k"]]
    for got, want in zip(served["top_k"], expected["top_k"], strict=True):
        assert got["probability"] == pytest.approx(want["probability"], abs=tolerance)


def _answers_as_vgg_predict(url: str, model_file: Path, images: dict, capsys, headers: dict | None = None) -> None:
    backend = _get(url + "/model", headers)[1]["backend"]
    paths = list(images.values())
    expected = _vgg_predict_json(model_file, paths, capsys)
    files = [(p.name, p.read_bytes()) for p in paths]
    status, answer = _post_files(url, files, query="?top_k=3", headers=headers)
    assert status == 200
    assert [p["image"] for p in answer["predictions"]] == [p.name for p in paths]
    for served, want in zip(answer["predictions"], expected, strict=True):
        _same(served, want, TOLERANCE[backend])
    status, one = _post_image(url, images["noise.jpg"].read_bytes(), "image/jpeg", headers)
    assert status == 200 and len(one["predictions"]) == 1
    _same({**one["predictions"][0], "top_k": one["predictions"][0]["top_k"][:3]}, expected[1], TOLERANCE[backend])


def test_good_images_answer_as_vgg_predict_does(server, model_file, images, capsys):
    _answers_as_vgg_predict(server[0], model_file, images, capsys)


def test_torch_backend_answers_as_vgg_predict_does(guarded, model_file, images, capsys):
    _answers_as_vgg_predict(guarded, model_file, images, capsys, {"Authorization": f"Bearer {TOKEN}"})


def test_serve_refuses_a_missing_model_or_unknown_backend_before_starting(model_file, tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "nope.safetensors")]) == 2
    assert "Model file not found" in capsys.readouterr().err
    assert cli.main(["serve", str(model_file), "--backend", "tensorflow"]) == 2
    assert "--backend must be one of auto, torch, onnxruntime" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], r"--port must be from 0 to 65535 \(0: any free port\)\. Received: 70000\."),
        (["--port", "-1"], r"--port must be from 0 to 65535 \(0: any free port\)\. Received: -1\."),
        (["--workers", "0"], r"--workers must be an integer of at least 1\. Received: 0\."),
        (["--max-batch", "-3"], r"--max-batch must be an integer of at least 1\. Received: -3\."),
        (["--top-k", "0"], r"--top-k must be an integer of at least 1\. Received: 0\."),
        (["--max-files", "0"], r"--max-files must be an integer of at least 1\. Received: 0\."),
        (["--max-pixels", "0"], r"--max-pixels must be an integer of at least 1\. Received: 0\."),
        (["--rate-limit", "-1"], r"--rate-limit must be an integer of at least 0\. Received: -1\."),
        (["--max-wait-ms", "nan"], r"--max-wait-ms must be a number of at least 0\. Received: nan\."),
        (["--max-wait-ms", "-5"], r"--max-wait-ms must be a number of at least 0\. Received: -5\.0\."),
        (["--max-body-mb", "nan"], r"vgg serve: argument --max-body-mb: expected a positive number, received 'nan'"),
        (["--max-body-mb", "0"], r"vgg serve: argument --max-body-mb: expected a positive number, received '0'"),
    ],
)
def test_each_serve_setting_out_of_range_is_one_line_before_the_model_loads(args, message, tmp_path, capsys):
    # The model file does not exist: a setting refused first shows that nothing was read or started.
    assert cli.main(["serve", str(tmp_path / "nope.safetensors"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(rf"^error: {message}$", err.strip()), err


def test_serve_refuses_a_busy_port_bad_address_or_bad_model_in_one_line(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VGG_CACHE_DIR", str(tmp_path / "cache"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a model at all")
    run = tmp_path / "run"  # a run folder, given where its model file belongs
    run.mkdir()
    (run / "best.safetensors").write_bytes(model_file.read_bytes())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        cases = [
            (["--port", taken], rf"Cannot listen on 127\.0\.0\.1:{taken}: Address already in use"),
            (["--host", "no-such-host.invalid", "--token", TOKEN], r"Cannot listen on no-such-host\.invalid:"),
        ]
        for args, message in cases:
            assert cli.main(["serve", str(model_file), *args]) == 2, args
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and re.search(rf"^error: {message}", err), err
    for model, message in [
        (junk, r"junk\.safetensors is not a vgg model file"),
        (run, r"run is a folder, not a model file\. Did you mean .*best\.safetensors\?"),
        (tmp_path / "nope.onnx", r"ONNX file not found: .*nope\.onnx"),
    ]:
        assert cli.main(["serve", str(model), "--port", str(_free_port())]) == 2, model
        lines = capsys.readouterr().err.strip().splitlines()
        assert re.search(rf"^error: .*{message}", lines[-1]), lines
        assert not any("Traceback" in line for line in lines), lines


def test_model_and_metrics_describe_the_server(server):
    url, _ = server
    status, model = _get(url + "/model")
    assert status == 200 and model["classes"] == CLASSES and model["input_size"] == 32 and model["arch"] == "vgg11"
    assert model["backend"] == ("torch" if torch.cuda.is_available() else "onnxruntime")  # the measured default
    assert model["preprocessing"]["mean"] == [0.5] * 3 and model["versions"]["torch"] == torch.__version__
    status, metrics = _get(url + "/metrics")
    assert (
        status == 200 and "vgg_request_seconds_bucket" in metrics["text"] and "vgg_batch_size_count" in metrics["text"]
    )


BAD_INPUTS = [
    ("empty body", (b"", "image/png"), 400, "empty"),
    ("text as an image", (b"hello, this is not a picture\n" * 4, "image/png"), 422, "not_an_image"),
    ("truncated png", (None, "image/png"), 422, "truncated"),
    ("too many pixels", (_png_claiming(2000, 2000), "image/png"), 413, "too_many_pixels"),
    ("too many frames", (_gif(101), "image/gif"), 413, "too_many_frames"),
    ("wrong content type", (b"{}", "application/json"), 415, "wrong_content_type"),
    ("body too large", (b"\x89PNG" + b"\0" * (2 * 1024**2), "image/png"), 413, "body_too_large"),
    # torchvision's libpng decoder segfaults on it; `vgg.decoding` now sends PNGs to Pillow, which calls it corrupt.
    ("crashing png", (crashing_png(), "image/png"), 422, ("corrupt", "decoder_crashed")),
]


def _send_bad(url: str, name: str, payload: tuple, good: bytes) -> tuple[int, dict]:
    data, content_type = payload
    if data is None:  # the truncated file: half of a good one
        data = good[: len(good) // 2]
    return _post_image(url, data, content_type)


def test_each_bad_input_gets_its_4xx_and_the_server_stays_healthy_and_small(server, images):
    url, proc = server
    good = images["red.png"].read_bytes()
    for name, payload, status, kind in BAD_INPUTS:
        got, answer = _send_bad(url, name, payload, good)
        assert got == status and answer.get("error") in ((kind,) if isinstance(kind, str) else kind), (name, answer)
        assert answer["message"], name
        assert _get(url + "/health") == (200, {"status": "ok"}), f"unhealthy after {name}"
    status, headers, _ = _request(url + "/predict", b"", {"Content-Type": "image/png"})
    assert status == 400 and "x-vgg-error" not in {k.lower() for k in headers}  # internal to the server
    got, answer = _post_files(url, [(f"{i}.png", good) for i in range(5)])
    assert (got, answer["error"]) == (413, "too_many_files")
    status, _, body = _request(url + "/predict?top_k=many", good, {"Content-Type": "image/png"})
    assert (status, json.loads(body)["error"]) == (400, "bad_request")
    # Memory: after one warm-up round, five more rounds of every bad input leave the server's size about the same.
    before = _rss_kb(proc.pid)
    for _ in range(5):
        for name, payload, _, _ in BAD_INPUTS:
            _send_bad(url, name, payload, good)
    grown_mb = (_rss_kb(proc.pid) - before) / 1024
    assert grown_mb < 40, f"server grew by {grown_mb:.0f} MB on bad input"
    assert _post_image(url, good)[0] == 200
    status, metrics = _get(url + "/metrics")
    assert 'vgg_errors_total{kind="truncated"}' in metrics["text"]


CRASH_MARKER = b"CRASH-THE-DECODER"


def _decode_or_die(data: bytes, info: ModelInfo, limits: Limits) -> np.ndarray:
    """A decoder that dies as a segfaulting native one does (the process ends at once) on a marker."""
    if data.startswith(CRASH_MARKER):
        os._exit(139)
    time.sleep(0.2)  # still busy when the crash happens: an innocent image in flight in the same pool
    return decode_for_model(data, info, limits)


def test_a_crashing_decoder_fails_only_its_own_image_and_the_pool_recovers(images):
    """Simulated (os._exit in the worker): since `vgg.decoding` moved PNGs to Pillow, no file at hand crashes it."""
    info = ModelInfo("vgg11", CLASSES, 32, [0.5] * 3, [0.25] * 3)
    good = images["red.png"].read_bytes()

    async def scenario(pool: DecoderPool) -> list:
        return await asyncio.gather(
            pool.decode(good), pool.decode(CRASH_MARKER), pool.decode(good), return_exceptions=True
        )

    pool = DecoderPool(2, info, Limits(), decode=_decode_or_die)
    try:
        first, crashed, second = asyncio.run(scenario(pool))
        assert isinstance(crashed, DecoderCrashed)
        assert first.shape == second.shape == (3, 32, 32), (first, second)  # retried in the fresh pool
        assert pool.crashes >= 1
        again = asyncio.run(pool.decode(good))
        assert np.array_equal(again, first)
    finally:
        pool.close()


def test_a_concurrent_burst_is_all_answered_in_micro_batches(server, images):
    url, _ = server
    data = images["red.png"].read_bytes()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _post_image(url, data), range(48)))
    assert [status for status, _ in results] == [200] * 48
    assert len({r["predictions"][0]["label"] for _, r in results}) == 1
    text = _get(url + "/metrics")[1]["text"]
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    singles, batches = values['vgg_batch_size_bucket{le="1"}'], values["vgg_batch_size_count"]
    assert batches > singles, "no batch of more than one image was formed"


def test_explain_answers_a_grad_cam_overlay_of_the_predicted_class(server, model_file, images, capsys):
    url, _ = server
    path = images["noise.jpg"]
    expected = _vgg_predict_json(model_file, [path], capsys)[0]["label"]
    status, headers, body = _request(url + "/explain", path.read_bytes(), {"Content-Type": "image/jpeg"})
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-class"] == expected
    overlay = Image.open(io.BytesIO(body))
    assert overlay.size == (224, 224) and overlay.mode == "RGB"
    status, _, body = _request(url + "/explain?class=wolf", path.read_bytes(), {"Content-Type": "image/jpeg"})
    assert status == 400 and "class must be one of the model's classes" in json.loads(body)["message"]


def test_without_cors_origin_no_cors_headers(server):
    url, _ = server
    status, headers, _ = _request(url + "/model", headers={"Origin": ORIGIN})
    assert status == 200 and "access-control-allow-origin" not in {k.lower() for k in headers}


@pytest.fixture(scope="module")
def guarded(model_file) -> Iterator[str]:
    """A server with a token (from the environment), one allowed CORS origin, a small request budget, and the
    torch backend (the default server has the CPU default, onnxruntime)."""
    args = ["--cors-origin", ORIGIN, "--rate-limit", "30", "--backend", "torch"]
    with running_server(model_file, *args, env={"VGG_SERVE_TOKEN": TOKEN}) as (url, _):
        yield url


def test_token_is_required_everywhere_but_health(guarded, images):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _get(guarded + "/health")[0] == 200
    for path in ("/model", "/metrics"):
        assert _get(guarded + path)[0] == 401
        assert _get(guarded + path, {"Authorization": "Bearer wrong"})[0] == 401
        assert _get(guarded + path, auth)[0] == 200
    data = images["red.png"].read_bytes()
    status, answer = _post_image(guarded, data)
    assert (status, answer["error"]) == (401, "unauthorized")
    assert _post_image(guarded, data, headers=auth)[0] == 200


def test_cors_allows_only_the_named_origin(guarded):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    status, headers, _ = _request(guarded + "/predict", headers=preflight, method="OPTIONS")
    lower = {k.lower(): v for k, v in headers.items()}
    assert status == 200 and lower["access-control-allow-origin"] == ORIGIN
    other = {**preflight, "Origin": "http://evil.example"}
    status, headers, _ = _request(guarded + "/predict", headers=other, method="OPTIONS")
    assert "access-control-allow-origin" not in {k.lower() for k in headers}


def test_web_page_shows_the_top_class_vgg_predict_gives(server, model_file, images, capsys):
    from browser import headless_chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    path = images["noise.jpg"]
    expected = _vgg_predict_json(model_file, [path], capsys)[0]["label"]
    with headless_chromium() as driver:
        # A phone's screen (headless windows have a minimum width, so the viewport is emulated).
        metrics = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "files").send_keys(str(path))
        result = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result .row .label"))
        assert result[0].text == expected
        overlay = "return [...document.querySelectorAll('img.cam')].filter(i => !i.hidden && i.naturalWidth).length"
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(overlay) == 1)  # the Grad-CAM overlay
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scrolling


def test_rate_limit_answers_429(guarded):
    # Last in the file: it spends the guarded server's budget (30 a minute) for this client.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    statuses = [_get(guarded + "/model", auth)[0] for _ in range(40)]
    assert set(statuses) == {200, 429} and statuses[-1] == 429
    assert _get(guarded + "/health")[0] == 200  # health checks are never limited
