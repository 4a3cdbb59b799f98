"""Take docs/serve.png: `vgg serve MODEL` in headless chromium at phone width, after uploading IMAGES.

    python docs/screenshot_serve.py runs/fashion/best.safetensors data/fashion-mnist/test/bag/00018.png ... \
        --out docs/serve.png
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import headless_chromium  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", default="docs/serve.png")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "vgg", "serve", args.model, "--port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with headless_chromium() as driver:
            metrics = {"width": 390, "height": 700, "deviceScaleFactor": 1, "mobile": True}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            driver.get(url + "/")
            time.sleep(1)
            driver.find_element("id", "files").send_keys("\n".join(str(Path(p).resolve()) for p in args.images))
            shown = "return [...document.querySelectorAll('img.cam')].filter(i => !i.hidden && i.naturalWidth).length"
            for _ in range(240):  # the bars, then each image's Grad-CAM overlay
                if driver.execute_script(shown) == len(args.images):
                    break
                time.sleep(0.5)
            time.sleep(0.5)
            png = driver.get_screenshot_as_png()
        # A palette PNG: the page is flat colours, so this keeps it small.
        Image.open(io.BytesIO(png)).convert("RGB").quantize(64).save(args.out, optimize=True)
        print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes)")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
