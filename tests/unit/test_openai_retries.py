"""The `openai` engine's retries against a small HTTP server on loopback that fails on purpose: the
first request to fail for good stops the others at once, and a Retry-After date is honoured."""

from __future__ import annotations

import email.utils
import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flywheel import config as C
from flywheel.errors import EngineError
from flywheel.models import engines

OK = json.dumps({"choices": [{"text": " 4", "finish_reason": "stop"}], "usage": {"completion_tokens": 1}}).encode()


class Server:
    """Answers each POST by the first word of its prompt: "fail" (500), "hang" (no answer until the
    test ends), "busy" (429, Retry-After 30 s), "later" (429 with a Retry-After date 1.5 s ahead,
    then 200), anything else 200. Records when each prompt was asked."""

    def __init__(self) -> None:
        self.hits: dict[str, list[float]] = defaultdict(list)
        self.released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
                server.hits[prompt].append(time.monotonic())
                server.answer(self, prompt.split()[0], len(server.hits[prompt]))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, h: BaseHTTPRequestHandler, kind: str, nth: int) -> None:
        if kind == "hang":
            self.released.wait(30)
            return
        status, headers, body = 200, {"Content-Type": "application/json"}, OK
        if kind == "fail":
            status, headers, body = 500, {}, b"internal error"
        elif kind == "busy":
            status, headers, body = 429, {"Retry-After": "30"}, b""
        elif kind == "later" and nth == 1:
            status, headers, body = 429, {"Retry-After": email.utils.formatdate(time.time() + 1.5, usegmt=True)}, b""
        h.send_response(status)
        for k, v in (headers | {"Content-Length": str(len(body))}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def engine(self, **openai) -> engines.OpenAIEngine:
        port = self.httpd.server_address[1]
        return engines.OpenAIEngine(
            C.ModelConfig(
                name="m",
                engine="openai",
                openai={"base_url": f"http://127.0.0.1:{port}/v1", "backoff_s": 0.01, **openai},
            )
        )


@pytest.fixture
def server():
    s = Server()
    yield s
    s.released.set()
    s.httpd.shutdown()


def bodies(*prompts: str) -> list[dict]:
    return [engines.openai_completion("greedy", "m", p, max_new_tokens=2) for p in prompts]


def test_the_first_request_to_fail_for_good_stops_the_others(server):
    """Requests in flight end with their current try, none retries, none queued starts: the error
    arrives within one timeout, not after every other request's retries (4 × 1 s, or 30 s asked)."""
    e = server.engine(retries=3, timeout_s=1.0, max_concurrency=4)
    start = time.monotonic()
    with pytest.raises(EngineError, match="failed after 4 tries: HTTP 500 internal error"):
        e._map(bodies("hang 0", "hang 1", "busy 2", "fail 3", "hang 4", "hang 5"), None)
    elapsed = time.monotonic() - start
    assert len(server.hits["fail 3"]) == 4  # its own retries ran
    assert [len(server.hits[p]) for p in ("hang 0", "hang 1", "busy 2")] == [1, 1, 1]  # no retry after it
    assert not server.hits["hang 4"] and not server.hits["hang 5"]  # queued requests never start
    assert 0.9 < elapsed < 1.8, f"the error took {elapsed:.2f} s"  # the in-flight tries' timeout, once


def test_a_batch_that_succeeds_keeps_every_answer_in_order(server):
    e = server.engine(retries=1, timeout_s=5.0, max_concurrency=3)
    answers = e._map(bodies(*(f"ok {i}" for i in range(7))), None)
    assert len(answers) == 7 and all(a["choices"][0]["text"] == " 4" for a in answers)
    assert all(len(server.hits[f"ok {i}"]) == 1 for i in range(7))


def test_retry_after_as_an_http_date_is_honoured(server):
    e = server.engine(retries=2, timeout_s=5.0)
    assert e._map(bodies("later"), None)[0]["choices"][0]["text"] == " 4"
    first, second = server.hits["later"]
    # the date has whole seconds: 0.5 to 1.5 s ahead when sent; the backoff alone would be 0.01 s
    assert 0.45 < second - first < 2.0


def test_retry_after_forms_and_cap():
    def ahead(seconds: float) -> str:
        return email.utils.formatdate(time.time() + seconds, usegmt=True)

    assert engines._retry_after("2.5") == 2.5 and engines._retry_after("3600") == 60.0
    assert 25 < engines._retry_after(ahead(30)) <= 30
    assert engines._retry_after(ahead(3600)) == 60.0  # capped as the seconds form is
    assert engines._retry_after(ahead(-30)) == 0.0  # a date gone by: retry now
    assert 25 < engines._retry_after(ahead(30).replace("GMT", "-0000")) <= 30  # no zone: UTC
    assert engines._retry_after("Wed, 21 Oct 2026 07:28:00 GMT") is not None
    assert engines._retry_after("soon") is None and engines._retry_after("nan") is None
    assert engines._retry_after(None) is None
