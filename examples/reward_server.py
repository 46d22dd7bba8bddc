"""A minimal reward server for ``flowdppo.rewards.http`` (stdlib + Pillow only).

It answers ``POST /`` with JSON ``{"prompts": [...], "images": [<base64 PNG>, ...]}`` by
``{"rewards": [...]}``, one float per image. The built-in score is the mean brightness
of each image; replace :func:`score` with a real model (load it once, at start-up).

    python examples/reward_server.py --port 8000
    FLOWDPPO_REWARD_URL=http://127.0.0.1:8000/ flowdppo train reward.names=[http]

Binds to 127.0.0.1 by default; use --host 0.0.0.0 only on a trusted network.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

Score = Callable[[list[np.ndarray], list[str]], list[float]]


def score(images: list[np.ndarray], prompts: list[str]) -> list[float]:
    """Mean brightness in [0, 1] of each RGB image (H, W, 3 uint8)."""
    return [float(img.mean() / 255.0) for img in images]


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def make_handler(fn: Score) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                prompts, images = request["prompts"], request["images"]
                if len(prompts) != len(images):
                    raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
                rewards = fn([decode_png(i) for i in images], prompts)
            except (ValueError, KeyError, TypeError, OSError) as exc:
                self._send(400, {"error": str(exc)})
                return
            self._send(200, {"rewards": rewards})

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # keep test output quiet
            pass

    return Handler


def make_server(host: str = "127.0.0.1", port: int = 0, fn: Score = score) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (port 0: a free one, see ``server.server_address``)."""
    return ThreadingHTTPServer((host, port), make_handler(fn))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = make_server(args.host, args.port)
    host, port = server.server_address[:2]
    print(f"reward server on http://{host}:{port}/ (Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
