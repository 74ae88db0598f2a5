"""An OpenAI-compatible chat server on loopback, serving tiny local models, for backend tests.

Messages with an image go to the VLM, text-only ones to the LM (or the VLM without an image).
`fail` decides, per request, an HTTP status to answer with instead (for retry tests); `malformed`
decides, per request, a body to answer with status 200 instead (bytes as they are, anything else as
JSON: for malformed-reply tests); requests from number `hold_from` on hang until `release` is set
(for kill-and-resume tests). Every request is recorded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from finedefics.attributes.backends import HFText
from finedefics.models.mllm import MLLM


class ModelServer:
    def __init__(self, vlm: MLLM | None = None, lm: HFText | None = None, max_tokens: int = 8):
        self.vlm, self.lm, self.max_tokens = vlm, lm, max_tokens
        self.fail: Callable[[int, dict], int | None] = lambda index, request: None
        self.malformed: Callable[[int, dict], object | None] = lambda index, request: None
        self.hold_from: int | None = None
        self.holding = threading.Event()  # set when the first request is held
        self.release = threading.Event()
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server.handle(body, self.headers.get("Authorization"))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a killed client: nothing to report
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ModelServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, body: dict, auth: str | None) -> tuple[int, object]:
        content = body["messages"][-1]["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        text = " ".join(p["text"] for p in parts if p["type"] == "text")
        image = next((p["image_url"]["url"] for p in parts if p["type"] == "image_url"), None)
        pixels = base64.b64decode(image.split(",", 1)[1]) if image else None
        with self._lock:
            index = len(self.requests)
            record = {
                "text": text,
                "image_sha1": hashlib.sha1(pixels).hexdigest() if pixels else None,
                "auth": auth,
                "model": body["model"],
            }
            self.requests.append(record)
        if self.hold_from is not None and index >= self.hold_from:
            self.holding.set()
            self.release.wait()
        status = self.fail(index, record)
        if status:
            return status, {"error": {"message": "injected failure"}}
        bad = self.malformed(index, record)
        if bad is not None:
            return 200, bad
        with self._lock:
            if pixels is not None:
                picture = Image.open(io.BytesIO(pixels)).convert("RGB")
                answer = self.vlm.generate([self.vlm.prompt(text, image=True)], [picture], self.max_tokens)[0]
            elif self.lm is not None:  # the request's token budget and temperature, as a real server
                lm = replace(self.lm, max_new_tokens=body.get("max_tokens") or self.lm.max_new_tokens)
                answer = lm.complete([text], body.get("temperature") or 0.0)[0]
            else:
                answer = self.vlm.generate([self.vlm.prompt(text, image=False)], None, self.max_tokens)[0]
        return 200, {
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
        }
