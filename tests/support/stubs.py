"""A stand-in for an OpenAI-compatible server where a test needs one that misbehaves on purpose or
records what it is sent (the real servers, llama.cpp's and vLLM's, are in the tests that use them)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OneToken(BaseHTTPRequestHandler):
    """/completions answering " 4" and no log-probs. A subclass overrides `before` to record the request
    or answer otherwise (return True when it has answered)."""

    def before(self) -> bool:
        return False

    def do_POST(self):  # http.server names it
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.before():
            return
        body = json.dumps(
            {"choices": [{"text": " 4", "finish_reason": "stop", "logprobs": None}], "usage": {"completion_tokens": 1}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], port: int = 0) -> Iterator[int]:
    """`handler` on a loopback port (`port`, or a free one) for the block; yields the port."""
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
