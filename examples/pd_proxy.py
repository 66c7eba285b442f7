"""A minimal OpenAI-compatible proxy for prefill/decode disaggregation with kvtier.

Why: in a PD pair the prefill instance (``kv_role: kv_producer``) computes each prompt's KV and
kvtier writes it to a shared tier (disk folder, Redis); the decode instance (``kv_role:
kv_consumer``) finds it there by the prompt's token hashes and loads all but the last prompt
token instead of recomputing the prompt. Clients should see one server, so this proxy, for each
``POST /v1/completions`` and ``POST /v1/chat/completions``:

1. sends the request to the prefill server with ``max_tokens=1`` (not streamed) and waits for it:
   when it returns, the prompt's KV has been computed and handed to kvtier;
2. sends the original request to the decode server and returns its answer, streaming included
   (server-sent events are passed through as they arrive).

No KV-transfer parameters travel between the two: kvtier's keys depend only on the model, the
tokens and the cache layout, so the decoder finds what the prefiller stored. ``GET /v1/models``
and ``GET /health`` go to the decoder. Backend failures come back as HTTP errors with a JSON body
(the backend's own status and body, 502 when unreachable, 504 on timeout), never as a hang.
Standard library only (``http.server`` + ``urllib``), one thread per client connection.

    python examples/pd_proxy.py --port 8000 --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
FORWARD_GET_PATHS = ("/v1/models", "/health")
FORWARD_HEADERS = ("Authorization", "X-Request-Id")
MAX_BODY_BYTES = 64 << 20


class BackendError(Exception):
    """A backend answered with an error, could not be reached, or timed out."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


def error_body(message: str, status: int, kind: str = "proxy_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The request for the prefill server: same prompt and sampling, one token, not streamed."""
    request = dict(body, max_tokens=1, stream=False, n=1, min_tokens=0)
    if "max_completion_tokens" in request:  # chat: takes precedence over max_tokens
        request["max_completion_tokens"] = 1
    for key in ("stream_options", "best_of"):
        request.pop(key, None)
    return request


class Proxy:
    def __init__(self, prefill: str, decode: str, timeout: float, prefill_timeout: float) -> None:
        self.prefill, self.decode = prefill.rstrip("/"), decode.rstrip("/")
        self.timeout, self.prefill_timeout = timeout, prefill_timeout

    @staticmethod
    def open(url: str, data: bytes | None, headers: dict[str, str], timeout: float) -> Any:
        """``urlopen`` with every failure turned into a :class:`BackendError`."""
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:  # the backend's own error: pass status and body through
            with exc:
                body = exc.read() or error_body(f"{url}: HTTP {exc.code}", exc.code)
                raise BackendError(exc.code, body, exc.headers.get("Content-Type", "application/json")) from None
        except TimeoutError as exc:
            raise BackendError(504, error_body(f"{url} timed out after {timeout:g} s: {exc}", 504)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            status = 504 if isinstance(reason, TimeoutError) else 502
            raise BackendError(status, error_body(f"{url} unreachable: {reason}", status)) from None


    @staticmethod
    def fetch(url: str, data: bytes | None, headers: dict[str, str], timeout: float) -> tuple[int, bytes, str]:
        """Status, body and content type of a whole response; failures as :class:`BackendError`."""
        with Proxy.open(url, data, headers, timeout) as resp:
            try:
                return resp.status, resp.read(), resp.headers.get("Content-Type", "application/json")
            except OSError as exc:  # TimeoutError included: the answer stopped half-way
                raise BackendError(504, error_body(f"{url}: reading the response failed: {exc}", 504)) from None


class Handler(BaseHTTPRequestHandler):
    proxy: Proxy  # set on the class by main()
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        pass  # quiet; errors still reach the client as JSON

    def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def headers_out(self) -> dict[str, str]:
        out = {"Content-Type": "application/json"}
        out.update({h: self.headers[h] for h in FORWARD_HEADERS if self.headers.get(h)})
        return out

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.split("?")[0] not in FORWARD_GET_PATHS:
            return self.send(404, error_body(f"no route for GET {self.path}", 404, "not_found"))
        try:
            self.send(*Proxy.fetch(self.proxy.decode + self.path, None, self.headers_out(), self.proxy.timeout))
        except BackendError as exc:
            self.send(exc.status, exc.body, exc.content_type)

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:  # the body stays unread: this connection cannot go on
            self.close_connection = True
            status = 413 if length > 0 else 400
            return self.send(status, error_body("missing, bad or too large Content-Length", status, "invalid_request_error"))
        raw = self.rfile.read(length)
        if self.path.split("?")[0] not in GENERATE_PATHS:
            return self.send(404, error_body(f"no route for POST {self.path}", 404, "not_found"))
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as exc:
            return self.send(400, error_body(f"invalid JSON body: {exc}", 400, "invalid_request_error"))
        headers = self.headers_out()
        decode = self.proxy.decode + self.path
        try:  # 1. prefill: when it answers, the prompt's KV has been computed and handed to kvtier
            Proxy.fetch(self.proxy.prefill + self.path, json.dumps(prefill_request(body)).encode(), headers,
                        self.proxy.prefill_timeout)
            if not body.get("stream"):  # 2. decode
                return self.send(*Proxy.fetch(decode, raw, headers, self.proxy.timeout))
            resp = Proxy.open(decode, raw, headers, self.proxy.timeout)
        except BackendError as exc:
            return self.send(exc.status, exc.body, exc.content_type)
        with resp:
            self.relay_stream(resp, resp.headers.get("Content-Type", "text/event-stream"))

    def relay_stream(self, resp: Any, content_type: str) -> None:
        """Pass server-sent events through as they arrive (chunked transfer encoding)."""
        self.send_response(resp.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                try:
                    data = resp.read1(65536)
                except (TimeoutError, OSError) as exc:  # headers were sent: end the stream with an error event
                    event = b"data: " + error_body(f"decode server: {exc}", 504) + b"\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    data = b""
                if not data:
                    self.wfile.write(b"0\r\n\r\n")
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client left: drop the decoder's stream too
            self.close_connection = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", required=True, help="base URL of the prefill server (kv_producer)")
    parser.add_argument("--decode", required=True, help="base URL of the decode server (kv_consumer)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for a decode-server response or for each streamed read")
    parser.add_argument("--prefill-timeout", type=float, default=None,
                        help="seconds to wait for the prefill server (default: --timeout)")
    args = parser.parse_args(argv)
    Handler.proxy = Proxy(args.prefill, args.decode, args.timeout, args.prefill_timeout or args.timeout)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"pd_proxy: http://{args.host}:{args.port} -> prefill {args.prefill}, decode {args.decode}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
