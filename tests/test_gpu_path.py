"""The GPU path, correct before fast (issue 18): what can be shown on a CPU is tested here on one; the rest is marked
``gpu`` and skipped without CUDA (benchmarks/gpu_check.sh runs it on a lent GPU machine)."""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import saved_and_loaded
from PIL import Image
from torch import nn

from vgg import jpeg_batches
from vgg.batches import Batches, _collate_mixed
from vgg.decoding import decode
from vgg.inference import Step
from vgg.jpeg_batches import Encoded, Fallbacks, Packed, assemble, decode_batch, read_jpeg
from vgg.models import build
from vgg.scan import Sample
from vgg.training import autobatch
from vgg.training.augment import AugmentConfig
from vgg.training.config import TrainConfig
from vgg.training.epoch import Objective, Updates, train_one_epoch
from vgg.training.loop import Optimisation
from vgg.training.schedules import make_schedule
from vgg.training.state import rng_states, set_rng_states

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def write_jpegs(folder: Path, count: int, size: int = 32, seed: int = 0) -> list[Path]:
    """``count`` small noisy JPEGs (each different, so a mixed-up order shows)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, *args, timeout: float = 120) -> None:
    """Run ``target(rank, port, *args)`` in two spawned processes joined by gloo; a hang fails, never blocks."""
    port = free_port()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, port, *args)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
        process.join()
    assert not hung, f"{len(hung)} process(es) still running after {timeout} s: the ranks fell out of step"
    assert [p.exitcode for p in processes] == [0, 0]


def _join(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )


# 2. One batch, a few shared-memory descriptors -------------------------------------------------------------------


def test_a_packed_batch_is_five_tensors_whatever_its_size_and_unpacks_in_order(tmp_path: Path):
    paths = write_jpegs(tmp_path, 6)
    Image.new("RGB", (40, 20), (10, 200, 30)).save(tmp_path / "png.png")  # decoded in the worker
    for batch_size in (3, 7):
        names = [*paths[: batch_size - 1], tmp_path / "png.png"]
        items = [(read_jpeg(p, 32), i, str(p), "") for i, p in enumerate(names)]
        packed, labels, bad, order = _collate_mixed(items)
        tensors = [v for v in vars(packed).values() if isinstance(v, torch.Tensor)]
        assert len(tensors) == 5 and len(packed) == batch_size  # one descriptor each, not one per image
        unpacked = packed.unpack()
        assert isinstance(unpacked[-1], torch.Tensor) and torch.equal(unpacked[-1], decode(names[-1], 32))
        for item, path in zip(unpacked[:-1], names[:-1], strict=True):
            assert isinstance(item, Encoded) and bytes(item.data.numpy()) == path.read_bytes()
        images, _, _ = assemble(packed, labels, order, 32, torch.device("cpu"))
        assert torch.equal(images, torch.stack([decode(p, 32) for p in names]))


def test_streamed_device_decoding_finishes_under_a_low_open_file_limit(tmp_path: Path):
    # With one shared-memory file descriptor per image, batch 128 and 2 workers need ~512 descriptors: under a limit
    # of 256 the workers died and the main process waited forever. Packed, a batch needs five.
    write_jpegs(tmp_path / "a", 128, size=16)
    write_jpegs(tmp_path / "b", 128, size=16, seed=1)
    script = textwrap.dedent(f"""
        import resource, torch
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from vgg.batches import Batches
        from vgg.scan import scan_folder
        samples = scan_folder({str(tmp_path)!r}).samples
        batches = Batches(samples, 16, 128, True, seed=0, workers=2, cache="none", decode_device="cpu")
        seen = sum(len(labels) for _ in range(2) for _, labels in batches)
        print("images", seen)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "images 512" in done.stdout


# 5. Fallbacks are said, counted, and only the odd file falls back -------------------------------------------------


def test_one_corrupt_jpeg_falls_back_alone_and_is_logged_once_with_a_count(tmp_path: Path, monkeypatch, caplog):
    paths = write_jpegs(tmp_path, 8)
    items = [read_jpeg(p, 32) for p in paths]
    data = bytearray(items[3].data.numpy().tobytes())
    data[200:260] = b"\xff\xd9" * 30  # end-of-image markers in the scan: libjpeg-turbo refuses the file
    items[3] = Encoded(torch.frombuffer(data, dtype=torch.uint8), 1)
    calls: list[int] = []
    real = jpeg_batches.decode_jpeg

    def counting(data, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, **kwargs)

    monkeypatch.setattr(jpeg_batches, "decode_jpeg", counting)
    fallbacks = Fallbacks()
    with caplog.at_level(logging.WARNING, logger="vgg.jpeg_batches"):
        for _ in range(2):
            out = decode_batch(items, 32, "cpu", fallbacks)
    # Seven good files still came out of batched calls: 8 -> 4 + 4 -> (2 + 2) -> (1 + 1), never one call per file.
    assert sum(n for n in calls if n > 1) >= 7 * 2 and calls.count(1) <= 2 * 2
    assert [i for i, image in enumerate(out) if not isinstance(image, torch.Tensor)] in ([], [3])
    for i in (0, 1, 2, 4, 5, 6, 7):
        assert torch.equal(out[i], decode(paths[i], 32))
    assert fallbacks.counts == {"a JPEG the batch decoder rejects, decoded on the host": 2}
    warnings = [r for r in caplog.records if "batch decoder rejects" in r.getMessage()]
    assert len(warnings) == 1  # once per reason
    assert fallbacks.summary() == "decoder fallbacks: 2 x a JPEG the batch decoder rejects, decoded on the host"


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    ],
    ids=["oom", "cuda-error", "alloc-failed"],
)
def test_device_failures_are_raised_never_taken_for_bad_files(tmp_path: Path, monkeypatch, error):
    items = [read_jpeg(p, 32) for p in write_jpegs(tmp_path, 2)]

    def failing(data, **kwargs):
        raise error

    monkeypatch.setattr(jpeg_batches, "decode_jpeg", failing)
    fallbacks = Fallbacks()
    with pytest.raises(type(error), match=str(error)[:20]):
        decode_batch(items, 32, "cpu", fallbacks)
    assert not fallbacks.counts


# 3. Resume across memory layouts and devices ----------------------------------------------------------------------


def _optimisation(layout: torch.memory_format, device: torch.device | None = None) -> Optimisation:
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    # Eval mode: no dropout, so two models given the same batch take the same step whatever the RNG did between.
    model = build("vgg11", num_classes=2, image_size=32).to(device, memory_format=layout).eval()
    config = TrainConfig(data="unused", arch="vgg11", image_size=32, epochs=2, batch_size=2, optimizer="adamw")
    step = Step(device, "fp32", (0.5,) * 3, (0.25,) * 3, memory_format=layout)
    return Optimisation(model, config, steps_per_epoch=2, step=step)


def _train_step(run: Optimisation, layout: torch.memory_format, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 32, 32, generator=generator).to(run.device).contiguous(memory_format=layout)
    loss = nn.functional.cross_entropy(run.model(images), torch.tensor([0, 1], device=run.device))
    loss.backward()
    run.updates.optimizer.step()
    run.updates.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [(torch.contiguous_format, torch.channels_last), (torch.channels_last, torch.contiguous_format)],
    ids=["nchw-to-channels-last", "channels-last-to-nchw"],
)
def test_optimizer_state_resumes_in_the_parameters_layout(saved, resumed):
    before = _optimisation(saved)
    _train_step(before, saved, 1)
    state = before.state_dict([])
    state = saved_and_loaded(state)
    after = _optimisation(resumed)
    after.load_state_dict(state, [])
    for parameter in after.model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            moment = after.updates.optimizer.state[parameter][key]
            assert moment.stride() == parameter.stride(), key
            assert moment.is_contiguous(memory_format=resumed) or moment.ndim < 4
    # The moments are the saved ones, in the new layout, and training goes on from them exactly as it would have.
    for old, new in zip(before.model.parameters(), after.model.parameters(), strict=True):
        assert torch.equal(
            before.updates.optimizer.state[old]["exp_avg"], after.updates.optimizer.state[new]["exp_avg"]
        )
    _train_step(before, saved, 2)
    _train_step(after, resumed, 2)
    lr = after.updates.optimizer.param_groups[0]["lr"]
    assert all(int(after.updates.optimizer.state[p]["step"]) == 2 for p in after.model.parameters())
    # The layouts' kernels round differently, and Adam's normalised step magnifies that where a gradient is tiny:
    # one weight in thousands may take a rather different step (measured up to 1.6 lr). So the check is on the
    # mean distance: after a resume that kept the moments it was 7e-5 lr, after one that lost them 0.2 lr.
    pairs = zip(before.model.parameters(), after.model.parameters(), strict=True)
    drift = [(old - new).abs().flatten() for old, new in pairs]
    assert torch.cat(drift).mean() < 1e-3 * lr


@pytest.mark.gpu
@needs_cuda
def test_a_cpu_run_resumes_on_cuda_with_fused_channels_last_state():
    saved = _optimisation(torch.contiguous_format)  # fp32 on a CPU at >= 128 px keeps NCHW; forced here at 32 px
    _train_step(saved, torch.contiguous_format, 1)
    state = saved_and_loaded(saved.state_dict([]), map_location="cpu")
    cuda = torch.device("cuda")
    resumed = _optimisation(torch.channels_last, cuda)
    resumed.load_state_dict(state, [])
    for parameter in resumed.model.parameters():
        moment = resumed.updates.optimizer.state[parameter]["exp_avg"]
        assert moment.device == parameter.device and moment.stride() == parameter.stride()
    _train_step(resumed, torch.channels_last, 2)  # the fused CUDA AdamW refuses mixed layouts
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


# 6. RNG state for the devices there are ---------------------------------------------------------------------------


def test_rng_states_of_a_gpu_run_restore_on_a_machine_with_fewer_gpus_or_none():
    states = rng_states(torch.device("cpu"))
    torch_state = states["torch"].clone()
    # A run saved on an 8-GPU machine by an older version listed every GPU's state.
    states["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    torch.manual_seed(123)
    set_rng_states(states, torch.device("cpu"))  # was torch.cuda.set_rng_state_all: IndexError or no CUDA at all
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.gpu
@needs_cuda
def test_rng_state_of_a_many_gpu_run_restores_on_one_gpu():
    cuda = torch.device("cuda", 0)
    torch.cuda.manual_seed(7)
    own = torch.cuda.get_rng_state(cuda)
    states = rng_states(cuda)
    assert len(states["cuda"]) == 1  # only the process's GPU: no context on the others
    states["cuda"] = [own] + [torch.cuda.get_rng_state(cuda).clone().fill_(0)] * (torch.cuda.device_count() + 7)
    torch.cuda.manual_seed(99)
    set_rng_states(states, cuda)
    assert torch.equal(torch.cuda.get_rng_state(cuda), own)


def test_deterministic_means_errors_and_a_fixed_cublas_workspace(monkeypatch):
    from vgg.distributed import World
    from vgg.training.run import _set_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        _set_kernels(TrainConfig(data="x", deterministic=True), torch.device("cpu"), World())
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        _set_kernels(
            TrainConfig(data="x", deterministic=True, deterministic_warn_only=True), torch.device("cpu"), World()
        )
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


# 6. Equal steps on every rank when one rank's batch is all bad files ----------------------------------------------


def _ddp_epoch_with_a_bad_batch(rank: int, port: int, folder: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    _join(rank, port)
    paths = sorted(Path(folder).iterdir())
    samples = [Sample(path, i % 2) for i, path in enumerate(paths)]
    # Unshuffled: rank 0 takes files 0, 2, 4, 6 and rank 1 takes 1, 3, 5, 7; files 1 and 3 are bad, so rank 1's
    # first batch of 2 is empty.
    batches = Batches(samples, 16, 2, False, workers=0, cache="none", drop_last=True, rank=rank, world_size=2,
                      decode_device="cpu")  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))  # fmt: skip
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = TrainConfig(data="x", epochs=1, batch_size=2, warmup_epochs=0)
    step = Step(torch.device("cpu"), "fp32", (0.5,) * 3, (0.25,) * 3, memory_format=torch.contiguous_format)
    steps: list[int] = []
    result = train_one_epoch(
        ddp, batches, Updates(optimizer, make_schedule(optimizer, config, 2)), step,
        Objective(AugmentConfig(policy="none")), progress=False, on_step=lambda totals, done: steps.append(done),
    )  # fmt: skip
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"steps": steps, "seen": batches.skipped, "weights": weights, "result": result}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_a_rank_whose_batch_is_all_bad_files_keeps_step_with_the_others(tmp_path: Path):
    paths = write_jpegs(tmp_path / "data", 8, size=16)
    for i in (1, 3):
        paths[i].write_text("not a jpeg")
    run_ranks(_ddp_epoch_with_a_bad_batch, str(tmp_path / "data"), str(tmp_path), timeout=150)
    ranks = [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [1, 2]
    assert len(ranks[1]["seen"]) == 2 and not ranks[0]["seen"]
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # DDP kept the replicas identical
    # The metrics count only real images: 4 on rank 0, 2 on rank 1.
    assert ranks[0]["result"] == ranks[1]["result"]


# 4. --batch-size auto: one answer for every rank, a margin, the unfrozen trunk -------------------------------------


def _auto_batch(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    # Rank 1 has a sixteenth of rank 0's memory: alone, each would pick its own size.
    gigabytes = (4, 0.25)[rank]
    autobatch.available_memory = lambda: int(gigabytes * 1024**3)
    estimate, alone = autobatch._cpu_estimate, []
    autobatch._cpu_estimate = lambda *args: alone.append(estimate(*args)) or alone[-1]
    model = build("vgg11", num_classes=2, image_size=32)
    agreed = autobatch.find_batch_size(model, 32, torch.device("cpu"), "fp32", layout=torch.contiguous_format)
    Path(out, f"{rank}.txt").write_text(f"{alone[0]} {agreed}")
    dist.destroy_process_group()


def test_auto_batch_size_is_one_answer_for_all_ranks(tmp_path: Path):
    run_ranks(_auto_batch, str(tmp_path), timeout=150)
    (alone0, agreed0), (alone1, agreed1) = (map(int, (tmp_path / f"{r}.txt").read_text().split()) for r in range(2))
    assert alone0 > alone1  # the ranks disagree on their own...
    assert agreed0 == agreed1 == alone1  # ...and all take the smallest


def test_auto_batch_sizes_a_frozen_trunk_for_after_unfreezing(monkeypatch):
    model = build("vgg11", num_classes=2, image_size=32)
    model.features.requires_grad_(False)
    seen: list[int] = []
    monkeypatch.setattr(autobatch, "_cpu_estimate", lambda trial, *args: seen.append(
        sum(p.requires_grad for p in trial.parameters())) or 4)  # fmt: skip
    autobatch.find_batch_size(model, 32, torch.device("cpu"), "fp32", unfrozen=False)
    autobatch.find_batch_size(model, 32, torch.device("cpu"), "fp32", unfrozen=True)
    assert seen[0] < seen[1] == len(list(model.parameters()))
    assert not any(p.requires_grad for p in model.features.parameters())  # the model itself stays frozen


@pytest.mark.parametrize(
    ("message", "memory"),
    [
        ("CUDA out of memory. Tried to allocate 20.00 MiB", True),
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
        ("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`", True),
        ("Given groups=1, weight of size [64, 3, 3, 3], expected input to have 3 channels", False),
    ],
)
def test_cuda_search_stops_at_every_way_of_running_out_of_memory(monkeypatch, message: str, memory: bool):
    """The CUDA search logic, its device calls stood in for: a step that fails for lack of memory ends the search at
    the last size that fitted; any other error is the caller's."""
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    peaks = iter([10, 20, 40, 80, 160, 320])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: next(peaks))

    def step(trial, batch, *args):
        if batch >= 8:
            raise RuntimeError(message)

    monkeypatch.setattr(autobatch, "_trial_step", step)
    trial = nn.Linear(2, 2)
    search = lambda free: autobatch._cuda_search(trial, 32, torch.device("cpu"), "fp32", 512, None, free)  # noqa: E731
    if memory:
        assert search(1000) == 4
    else:
        with pytest.raises(RuntimeError, match="channels"):
            search(1000)


def test_cuda_search_keeps_a_margin_below_the_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    batches: list[int] = []
    monkeypatch.setattr(autobatch, "_trial_step", lambda trial, batch, *args: batches.append(batch))
    # A step's peak: 100 bytes of model state plus 100 per image.
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 100 + 100 * batches[-1])
    trial = nn.Linear(2, 2)
    # 1000 bytes free: batch 8 (900 bytes) would fit with no margin, but not under 85% of what is free.
    assert autobatch._cuda_search(trial, 32, torch.device("cpu"), "fp32", 512, None, 1000) == 4


@pytest.mark.gpu
@needs_cuda
def test_auto_batch_with_memory_ballast_then_trains_at_that_size():
    cuda = torch.device("cuda")
    free = torch.cuda.mem_get_info(cuda)[0]
    ballast = torch.empty(max(0, free - 6 * 1024**3), dtype=torch.uint8, device=cuda)  # leave about 6 GiB
    try:
        model = build("vgg16", num_classes=10, image_size=224)
        batch = autobatch.find_batch_size(model, 224, cuda, "bf16", limit=4096)
        assert batch >= 4 and batch & (batch - 1) == 0
        model = model.to(cuda, memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
        for _ in range(3):  # the real run's steps at the chosen size: cuDNN's benchmark picks workspaces too
            autobatch._trial_step(model, batch, 224, cuda, "bf16", torch.channels_last)
        torch.cuda.synchronize(cuda)
    finally:
        del ballast
        torch.backends.cudnn.benchmark = False
        torch.cuda.empty_cache()


# 1. nvJPEG ordered after the training stream ----------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_output_is_never_overwritten_by_queued_kernels(tmp_path: Path):
    """Decode the same batch many times while kernels that read freed memory are queued; compare with the host."""
    paths = write_jpegs(tmp_path, 64, size=224)
    items = [read_jpeg(p, 224) for p in paths]
    host = torch.stack([decode(p, 224) for p in paths]).cuda()
    cuda = torch.device("cuda")
    a = torch.randn(4096, 4096, device=cuda)
    worst = 0.0
    for _ in range(60):
        # Work queued on the training stream: the products read `scratch` long after it is freed on the host side,
        # so the allocator may hand its memory to the decoder while they still run.
        scratch = torch.randn(64 * 3 * 224 * 224 // 4, device=cuda)
        for _ in range(4):
            a = (a @ a).clamp_(-1, 1)
        scratch.mul_(2).add_(1)
        del scratch
        images = torch.stack(decode_batch(items, 224, cuda))
        difference = (images.float() - host.float()).abs()
        worst = max(worst, difference.mean().item())
        assert difference.mean().item() < 2.0  # nvJPEG and libjpeg-turbo differ by rounding, not by content
        assert (difference > 48).float().mean().item() < 0.001
    print(f"worst mean difference from the host decoder: {worst:.3f}")


@pytest.mark.gpu
@needs_cuda
def test_streamed_batches_decoded_on_cuda_equal_the_host_batches(tmp_path: Path):
    paths = write_jpegs(tmp_path / "a", 40, size=64)
    samples = [Sample(p, 0) for p in paths]
    host = Batches(samples, 64, 16, False, workers=2, cache="none")
    device = Batches(samples, 64, 16, False, workers=2, cache="none", decode_device="cuda")
    for (h, _), (d, _) in zip(host, device, strict=True):
        assert d.device.type == "cuda"
        assert (d.cpu().float() - h.float()).abs().mean().item() < 2.0
    assert not device.fallbacks.counts


def test_a_packed_batch_keeps_each_jpegs_orientation_and_the_items_order():
    packed = Packed.pack([Encoded(torch.arange(5, dtype=torch.uint8), 6), torch.zeros(3, 2, 2, dtype=torch.uint8)])
    [item, image] = packed.unpack()
    assert item.orientation == 6 and item.data.tolist() == [0, 1, 2, 3, 4] and image.shape == (3, 2, 2)


# 6. --deterministic really deterministic, also where CUDA's adaptive pooling has no deterministic backward --------


@pytest.mark.parametrize(("size", "side"), [(8, 7), (14, 7), (7, 7), (9, 13), (5, 2)])
def test_matrix_pool_is_adaptive_average_pooling(size: int, side: int):
    from vgg.models import MatrixPool

    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64, requires_grad=True)
    reference = nn.AdaptiveAvgPool2d(side)(x)
    pooled = MatrixPool(side)(x)
    torch.testing.assert_close(pooled, reference)
    (grad,) = torch.autograd.grad(pooled.square().sum(), x)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), x)
    torch.testing.assert_close(grad, reference_grad)


@pytest.mark.gpu
@needs_cuda
def test_deterministic_cuda_training_repeats_bit_for_bit(tmp_path: Path):
    from conftest import small_run
    from safetensors.torch import load_file

    # 256 px: VGG's last map (8x8) is really pooled to 7x7, where CUDA's adaptive pooling would stop the run.
    runs = [small_run(tmp_path / str(i), 2, "--image-size", "256", "--deterministic", "--device", "cuda")
            for i in range(2)]  # fmt: skip
    first, second = (load_file(run / "last.safetensors") for run in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
