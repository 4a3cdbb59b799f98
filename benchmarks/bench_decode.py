"""What safe decoding costs: ``vgg.decoding.decode_bytes`` against torchvision's native decoders on clean files.

torchvision 0.29's native PNG decoder kills the process on a corrupt file, so ``decode_bytes`` sends every format
but JPEG through Pillow. This measures both ways on the same bytes, on ONE core, decode + squash to ``--size``:
  native   what vgg did before: Pillow reads the header (pixel limit), torchvision's ``decode_image`` decodes
  vgg      ``decode_bytes`` as it is now
Sets: real Fashion-MNIST PNGs (28 x 28 grayscale, ``--fashion`` folder, if present) and synthetic 500 x 375 photos
as PNG, WebP, GIF and JPEG. Each set is timed ``--repeats`` times, alternating, and the best run kept (the machine
is shared). Results: benchmarks/RESULTS.md, "Decoding untrusted files".

Usage:
  python benchmarks/bench_decode.py [--fashion data/fashion-mnist/train] [--files 3000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from vgg.decoding import _header, decode_bytes
from vgg.scan import sniff


def _native(data: bytes, size: int) -> torch.Tensor:
    _header(data, sniff(data[:16]) or "image")
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return TF.resize(image[0] if image.ndim == 4 else image, [size, size], antialias=True)


def _photo(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 500)[None, :, None] * np.ones((375, 1, 3))
    pixels = np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def _rate(fn, files: list[bytes], size: int) -> float:
    start = time.perf_counter()
    for data in files:
        fn(data, size)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", default="data/fashion-mnist/train", help="folder of Fashion-MNIST PNGs")
    parser.add_argument("--files", type=int, default=3000, help="Fashion-MNIST files to decode per run")
    parser.add_argument("--photos", type=int, default=30, help="synthetic photos per format")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets: dict[str, list[bytes]] = {}
    fashion = sorted(Path(args.fashion).glob("*/*.png"))
    if fashion:
        step = max(1, len(fashion) // args.files)
        sets["fashion-mnist png 28px"] = [p.read_bytes() for p in fashion[::step][: args.files]]
    for fmt in ("PNG", "WEBP", "GIF", "JPEG"):
        sets[f"photo {fmt.lower()} 500x375"] = [_photo(fmt, i) for i in range(args.photos)]
    rows = []
    for name, files in sets.items():
        best = {"native": 0.0, "vgg": 0.0}
        for _ in range(args.repeats):
            best["native"] = max(best["native"], _rate(_native, files, args.size))
            best["vgg"] = max(best["vgg"], _rate(decode_bytes, files, args.size))
        rows.append({"set": name, "files": len(files), **{k: round(v) for k, v in best.items()}})
        print(
            f"{name:24s} native {best['native']:7.0f}/s  vgg {best['vgg']:7.0f}/s  "
            f"({100 * (best['vgg'] / best['native'] - 1):+.0f}%)",
            flush=True,
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
