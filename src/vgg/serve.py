"""``vgg serve``: a model behind HTTP (FastAPI + uvicorn), with a web page to try it.

Routes: ``POST /predict`` (one image as the raw body, or several as multipart files), ``POST /explain`` (one
image -> its Grad-CAM overlay as a PNG, ``vgg.explain``), ``GET /health``, ``GET /model``, ``GET /metrics``
(Prometheus text) and ``GET /`` (the web page, ``web/index.html``).

How a request flows: its bytes are decoded in a worker process (``decode_pool``: a crashing native decoder kills
a worker, never the server), then its images join a queue that one inference thread empties in micro-batches of
up to ``max_batch`` images, waiting at most ``max_wait_ms`` for a batch to fill. The event loop itself only moves
bytes. The numbers are ``vgg predict``'s: same decoding, same resizing, same model call.

Safety: binds to 127.0.0.1 unless told otherwise; limits on body bytes, files per request, pixels and frames per
image; a bearer token (``--token`` or ``VGG_SERVE_TOKEN``) on every route but ``/health`` and the page itself;
CORS off unless ``--cors-origin``; a per-client request budget (429 beyond it).

What runs the model is ``backends.py``; its CPU default was chosen by measurement (benchmarks/RESULTS.md, "Serving").
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import io
import logging
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from . import __version__
from .backends import BACKENDS, Backend, make_backend
from .decode_pool import DecodeError, DecoderCrashed, DecoderPool, Limits
from .errors import UsageError
from .explain import explain
from .httpkit import DRAIN_FACTOR, BodyLimit, Metrics, RateLimiter, body_too_large
from .microbatch import Busy, MicroBatcher
from .predict import Prediction, load

try:
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.middleware.cors import CORSMiddleware
except ImportError as error:  # the serve extra is optional
    raise UsageError("vgg serve needs FastAPI and uvicorn: pip install 'vgg[serve]'.") from error

log = logging.getLogger(__name__)

TOKEN_ENV = "VGG_SERVE_TOKEN"
ERROR_HEADER = "x-vgg-error"  # how an error's kind reaches the metrics middleware from the exception handler
OPEN_PATHS = frozenset({"/health", "/"})  # the page is static; it sends the token with its own requests
STATUS = {
    "empty": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "body_too_large": 413,
    "too_many_files": 413,
    "too_many_pixels": 413,
    "too_many_frames": 413,
    "wrong_content_type": 415,
    "not_an_image": 422,
    "truncated": 422,
    "corrupt": 422,
    "decoder_crashed": 422,
    "rate_limited": 429,
    "busy": 503,
}


@dataclass
class ServeConfig:
    """Everything ``vgg serve`` can be told; the defaults are the command's."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    max_batch: int = 32
    max_wait_ms: float = 5.0
    backend: str = "auto"
    device: str = "auto"
    token: str | None = None
    cors_origin: str | None = None
    top_k: int = 5
    max_body_bytes: int = 20 * 1024**2
    max_files: int = 16
    limits: Limits = field(default_factory=Limits)
    rate_limit: int = 600  # requests per client per minute; 0: no limit
    queue_size: int = 1024

    def validate(self) -> None:
        """Every setting in its range, in one line naming the flag, before anything starts."""
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}. Received: {self.backend!r}.")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be from 0 to 65535 (0: any free port). Received: {self.port!r}.")
        least = {
            "--workers": (self.workers, 1), "--max-batch": (self.max_batch, 1), "--top-k": (self.top_k, 1),
            "--max-files": (self.max_files, 1), "max_body_bytes": (self.max_body_bytes, 1),
            "--max-pixels": (self.limits.max_pixels, 1), "--rate-limit": (self.rate_limit, 0),
            "queue_size": (self.queue_size, 1), "--max-wait-ms": (self.max_wait_ms, 0),
        }  # fmt: skip
        for flag, (value, low) in least.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value < math.inf:
                kind = "a number" if flag == "--max-wait-ms" else "an integer"
                raise UsageError(f"{flag} must be {kind} of at least {low}. Received: {value!r}.")


class ApiError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def predictions(probabilities: np.ndarray, names: list[str], class_names: list[str], top_k: int) -> list[dict]:
    """One answer per image, exactly as ``vgg predict --json`` prints it (``Prediction.as_dict``)."""
    k = min(top_k, len(class_names))
    values, indices = torch.from_numpy(np.asarray(probabilities, dtype=np.float32)).topk(k, dim=1)
    out = []
    for name, vals, idxs in zip(names, values.tolist(), indices.tolist(), strict=True):
        top = [(class_names[i], p) for i, p in zip(idxs, vals, strict=True)]
        out.append(Prediction(top[0][0], top[0][1], top, name).as_dict())
    return out


def _error(kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=STATUS[kind])


def describe(config: ServeConfig, backend: Backend) -> dict[str, Any]:
    """What ``GET /model`` answers: the model, how images are prepared for it, how it is served, versions."""
    info = backend.info
    return {
        "arch": info.arch,
        "classes": info.class_names,
        "input_size": info.image_size,
        "preprocessing": {
            "resize": info.resize,
            "interpolation": info.interpolation,
            "mean": info.mean,
            "std": info.std,
            **{key: info.extra[key] for key in ("resize_size",) if key in info.extra},
        },
        "temperature": info.temperature,
        "backend": backend.name,
        **backend.details,
        "explain": not str(config.model).endswith(".onnx"),
        "max_batch": config.max_batch,
        "max_wait_ms": config.max_wait_ms,
        "limits": {
            "max_body_bytes": config.max_body_bytes,
            "max_files": config.max_files,
            "max_pixels": config.limits.max_pixels,
            "max_frames": config.limits.max_frames,
        },
        "versions": _versions(),
    }


async def receive_images(
    request: Request, config: ServeConfig, pool: DecoderPool
) -> tuple[list[str], list[np.ndarray]]:
    """The request's images, decoded for the model, or the ApiError that says why not."""
    length = request.headers.get("content-length")
    # Far too large by its own account: answered at once (smaller excess is read and dropped by BodyLimit).
    if length and length.isdigit() and int(length) > DRAIN_FACTOR * config.max_body_bytes:
        raise ApiError("body_too_large", f"body of {int(length):,} bytes, the limit is {config.max_body_bytes:,}")
    too_large = ApiError("body_too_large", f"body over {config.max_body_bytes:,} bytes")
    try:
        names, blobs = await _read_images(request, config.max_files)
    except ApiError:
        if body_too_large(request.scope):  # what a cut-short body looked like is beside the point
            raise too_large from None
        raise
    if body_too_large(request.scope):
        raise too_large
    images = await asyncio.gather(*(_decode(pool, name, blob) for name, blob in zip(names, blobs, strict=True)))
    return names, list(images)


def grad_cam_png(
    state: dict[str, Any], config: ServeConfig, image: np.ndarray, class_name: str | None
) -> tuple[bytes, str]:
    """One image's Grad-CAM overlay (``vgg.explain``) as PNG bytes, and the class it shows; runs in a thread."""
    # The Grad-CAM model loads on first use: a second copy of the weights, in PyTorch (it needs gradients).
    if "explainer" not in state:
        state["explainer"] = load(config.model, device=config.device, precision="fp32")
    try:
        (result,) = explain(state["explainer"], [torch.from_numpy(image)], class_name=class_name)
    except UsageError as error:
        raise ApiError("bad_request", str(error)) from None
    out = io.BytesIO()
    result.overlay().save(out, format="PNG")
    return out.getvalue(), result.class_name


def create_app(config: ServeConfig) -> FastAPI:
    """The application. The model loads here, so that a bad model file is an error before any server starts; the
    decoder processes and the batcher start with the app (FastAPI lifespan)."""
    config.validate()
    token = config.token or os.environ.get(TOKEN_ENV) or None
    metrics = Metrics()
    limiter = RateLimiter(config.rate_limit) if config.rate_limit > 0 else None
    backend = make_backend(config.model, config.backend, config.device)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        pool = DecoderPool(config.workers, backend.info, config.limits)
        batcher = MicroBatcher(backend.run, config.max_batch, config.max_wait_ms, config.queue_size)
        batcher.on_batch = metrics.observe_batch
        await pool.warm_up()
        task = asyncio.create_task(batcher.loop())
        state.update(backend=backend, pool=pool, batcher=batcher)
        state["explain_thread"] = ThreadPoolExecutor(1, thread_name_prefix="vgg-explain")
        log.warning("vgg serve: %s (%s) on http://%s:%d", config.model, backend.name, config.host, config.port)
        try:
            yield
        finally:
            task.cancel()
            pool.close()
            batcher.thread.shutdown(wait=False)
            state["explain_thread"].shutdown(wait=False)

    app = FastAPI(title="vgg", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_guard(app, config, metrics, token, limiter)
    _add_routes(app, config, state, metrics)
    return BodyLimit(_with_cors(app, config.cors_origin), config.max_body_bytes)


def _add_guard(
    app: FastAPI, config: ServeConfig, metrics: Metrics, token: str | None, limiter: RateLimiter | None
) -> None:
    """Token and rate limit on every route but the open ones, error bodies, and request metrics."""

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Any:
        start = time.perf_counter()
        path = request.url.path
        if token and path not in OPEN_PATHS and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                response = _error("unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>'")
                response.headers["WWW-Authenticate"] = "Bearer"
                return _count(response, path, start, "unauthorized")
        client = request.client.host if request.client else "?"
        if limiter and path not in OPEN_PATHS and not limiter.allow(client, time.monotonic()):
            response = _error("rate_limited", f"more than {config.rate_limit} requests a minute from {client}")
            response.headers["Retry-After"] = "1"
            return _count(response, path, start, "rate_limited")
        response = await call_next(request)
        kind = response.headers.get(ERROR_HEADER)
        if kind:
            del response.headers[ERROR_HEADER]  # for the metrics only: the body says the same to the client
        return _count(response, path, start, kind)

    def _count(response: Any, path: str, start: float, kind: str | None) -> Any:
        if kind:
            metrics.errors[kind] += 1
        known = path if path in {"/", "/predict", "/explain", "/health", "/model", "/metrics"} else "other"
        metrics.observe_request(known, response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        response = _error(error.kind, str(error))
        response.headers[ERROR_HEADER] = error.kind
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in error.errors())
        return await api_error(request, ApiError("bad_request", f"invalid request ({where})"))


def _add_routes(app: FastAPI, config: ServeConfig, state: dict[str, Any], metrics: Metrics) -> None:
    """The page, /health, /model, /metrics, /predict and /explain."""
    page = importlib.resources.files("vgg").joinpath("web/index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok" if "batcher" in state else "starting"}

    @app.get("/model")
    async def model() -> dict:
        return describe(config, state["backend"])

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return metrics.render()

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None) -> dict:
        k = config.top_k if top_k is None else top_k
        if not 1 <= k <= 1000:
            raise ApiError("bad_request", f"top_k must be between 1 and 1000. Received: top_k={top_k}.")
        names, images = await receive_images(request, config, state["pool"])
        batcher: MicroBatcher = state["batcher"]
        try:
            rows = await asyncio.gather(*(batcher.predict(image) for image in images))
        except Busy as error:
            raise ApiError("busy", str(error)) from None
        info = state["backend"].info
        return {"predictions": predictions(np.stack(rows), names, info.class_names, k)}

    @app.post("/explain")
    async def explain_route(request: Request, class_name: str | None = Query(None, alias="class")) -> Response:
        if str(config.model).endswith(".onnx"):
            raise ApiError("bad_request", "Grad-CAM needs the model's weights: serve the .safetensors file, not ONNX")
        names, images = await receive_images(request, config, state["pool"])
        if len(images) != 1:
            raise ApiError("bad_request", f"/explain takes one image. Received: {len(images)}.")
        loop = asyncio.get_running_loop()
        png, explained = await loop.run_in_executor(
            state["explain_thread"], grad_cam_png, state, config, images[0], class_name
        )
        return Response(png, media_type="image/png", headers={"X-Class": explained})


def _with_cors(app: FastAPI, origin: str | None) -> FastAPI:
    if origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[origin],
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


async def _read_images(request: Request, max_files: int) -> tuple[list[str], list[bytes]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        body = await request.body()
        if not body:
            raise ApiError("empty", "empty body: expected the bytes of an image file")
        return [""], [body]
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_files, max_fields=max_files)
        except HTTPException as error:
            kind = "too_many_files" if "Too many" in str(error.detail) else "bad_request"
            raise ApiError(kind, f"{error.detail} (at most {max_files} files per request)") from None
        files = [(key, value) for key, value in form.multi_items() if not isinstance(value, str)]
        if not files:
            raise ApiError("empty", "no files in the form: expected one or more image files")
        names, blobs = [], []
        for _, upload in files:
            names.append(upload.filename or "")
            blobs.append(await upload.read())
            await upload.close()
        return names, blobs
    raise ApiError(
        "wrong_content_type",
        f"Content-Type must be image/* (one image as the body) or multipart/form-data. Received: {content_type!r}.",
    )


async def _decode(pool: DecoderPool, name: str, blob: bytes) -> np.ndarray:
    label = f"{name}: " if name else ""
    if not blob:
        raise ApiError("empty", f"{label}empty file (0 bytes)")
    try:
        return await pool.decode(blob)
    except DecodeError as error:
        raise ApiError(error.kind, f"{label}{error}") from None
    except DecoderCrashed:
        raise ApiError("decoder_crashed", f"{label}decoder crashed on this image (a corrupt file)") from None


def _versions() -> dict[str, str]:
    import torchvision

    versions = {"vgg": __version__, "python": platform.python_version(), "torch": torch.__version__}
    versions["torchvision"] = torchvision.__version__
    if "onnxruntime" in sys.modules:
        versions["onnxruntime"] = sys.modules["onnxruntime"].__version__
    return versions


def serve(config: ServeConfig) -> None:
    """Run the server until interrupted."""
    import uvicorn

    config.validate()
    if config.host not in ("127.0.0.1", "localhost", "::1") and not (config.token or os.environ.get(TOKEN_ENV)):
        log.warning("vgg serve: listening on %s without a token: anyone who can reach it can use it", config.host)
    with _listen(config.host, config.port) as listening:
        config = replace(config, port=listening.getsockname()[1])  # the port chosen, where --port 0 asked for any
        settings = uvicorn.Config(
            create_app(config),
            host=config.host,
            port=config.port,
            log_level="warning",
            server_header=False,
            timeout_keep_alive=5,
            limit_concurrency=config.queue_size,
        )
        server = uvicorn.Server(settings)
        server.run(sockets=[listening])
    if not server.started:  # uvicorn has logged why (the decoder processes or the batcher failed to start)
        raise UsageError(f"vgg serve could not start {config.model} on {config.host}:{config.port} (see above).")


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, opened before the model loads: a port in use, a host that does not resolve or a port
    out of range is one line naming it, before anything starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except (OSError, OverflowError) as error:
        reason = (getattr(error, "strerror", None) or str(error)).rstrip(".")
        raise UsageError(
            f"Cannot listen on {host}:{port}: {reason}. Expected a free port (0-65535) on an address of this "
            "machine: pass another --port or --host."
        ) from None
