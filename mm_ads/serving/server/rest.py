"""TF Serving's REST API over a `PredictionServer`, on the standard library's `ThreadingHTTPServer`.

Routes (`<name>` the model name; `/versions/<v>` may follow it to pin a version):
  * `POST /v1/models/<name>:predict` — TF Serving's JSON (`instances` row format or `inputs` columnar
    format; see `mm_ads.serving.server.codec`); the response adds `"model_version"`.
  * `POST /v1/models/<name>:rank` — the ids-only ranking call (`mm_ads.serving.server.ranking.RankRequest`).
  * `GET /v1/models/<name>` — `{"model_version_status": [...]}` as TF Serving;
    `GET /v1/models/<name>/metadata` — the signature defs.
  * `GET /v1/stats` — the server's counters (requests, errors, unknown items).
Errors are `{"error": message}` with 400 (malformed: bad JSON, JSON nested too deeply, a NaN or infinite
input, a negative or non-numeric Content-Length), 404 (unknown model/version/signature/route), 408 (the body
did not arrive in time), 411 (no Content-Length), 413 (over the body or candidate limit), 503 (no version yet,
shutting down, or too many request bytes in flight).

Hostile clients (limits of `ServerConfig`):
  * the body size comes from Content-Length, checked against `max_body_bytes` before anything is read;
  * `max_inflight_bytes` bounds the bodies being read or handled at once over all connections: a request
    reserves its Content-Length before reading, waits up to `read_timeout_s` for room, else gets 503 (a body
    over 64 KiB is not read and its connection is closed);
  * `read_timeout_s`: the request line and headers must arrive within it (so an idle connection, new or kept
    alive, is closed after it and frees its slot), then the body within as long again — a deadline over all the
    reads, so a client trickling bytes cannot hold a thread either;
  * a client that disconnects (reset, broken pipe, timeout) ends its connection with one DEBUG line.

HTTP/1.1 keep-alive, one thread per connection, at most `max_connections` (more are closed at once). The model
calls (Predict, rank) run on the server's fixed pool of `rest_workers` threads (`PredictionServer.in_model_thread`):
a thread that has run the model leaves ~2 MB behind when it exits, so when the connection threads ran it, a client
opening a connection per request grew the server by ~2 MB a request (500 such requests: 758 → 1,800 MB).
Shutdown (`RestServer.stop`): stop accepting, close connections that are idle between requests, let
requests in progress finish and join their threads.
"""

import io
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import tensorflow as tf
from absl import logging
from google.protobuf import json_format

from mm_ads.serving.server.codec import parse_predict_json, predict_json_response
from mm_ads.serving.server.errors import InvalidArgument, NotFound, ResourceExhausted, ServingError, Unavailable
from mm_ads.serving.server.ranking import RankRequest

_ROUTE = re.compile(r"^/v1/models/([^/:]+)(?:/versions/([^/:]+))?(?::(predict|rank)|/(metadata))?$")


class _DeadlineReader(io.RawIOBase):
    """A connection's reads with one deadline over all of them (`deadline`: a `time.monotonic()` value).

    Each `recv` may wait only for what is left of the deadline, then `TimeoutError`: a per-read timeout alone
    would let a client that sends a byte now and then hold its connection forever.
    """

    def __init__(self, sock):
        super().__init__()
        self._sock = sock
        self.deadline = None

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("read deadline passed")
            self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _ByteBudget:
    """Bytes of request bodies in flight over all connections, at most `limit`."""

    def __init__(self, limit):
        self.limit = int(limit)
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n, timeout):
        """Reserves `n` bytes, waiting up to `timeout` seconds for room; False if there was none."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + n <= self.limit, timeout):
                return False
            self.used += n
            return True

    def release(self, n):
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def _parse_version(text):
    if text is None:
        return None
    if not text.isdigit():
        raise InvalidArgument(f"version must be a positive integer, got {text!r}")
    return int(text)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mm_ads-serving"
    timeout = None  # reads have a deadline instead (`_DeadlineReader`, the server's `read_timeout_s`)
    disable_nagle_algorithm = True  # TCP_NODELAY: headers and body writes must not wait for delayed ACKs

    def setup(self):
        super().setup()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, max(self.rbufsize, io.DEFAULT_BUFFER_SIZE))
        self._held = 0  # bytes of the in-flight budget this request holds
        self.server.track(self, busy=False)

    def finish(self):
        self.server.untrack(self)
        super().finish()

    def parse_request(self):  # called right after the request line arrived
        self.server.track(self, busy=True)
        return super().parse_request()

    def handle_one_request(self):
        self._reader.deadline = time.monotonic() + self.server.read_timeout_s  # request line + headers
        try:
            super().handle_one_request()
        finally:
            if self.server.stopping.is_set():
                self.close_connection = True
            self.server.track(self, busy=False)

    def log_message(self, format, *args):  # access logs only at debug level
        logging.debug("rest %s - " + format, self.address_string(), *args)

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.connection.settimeout(self.server.read_timeout_s)  # a client that does not read its response
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.server.stopping.is_set() or self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method):
        app = self.server.app
        app.stats.add(**{f"rest_{method.lower()}": 1})
        try:
            if self.server.stopping.is_set():
                raise Unavailable("the server is shutting down")
            try:
                status, body = self._route(method, app)
            finally:
                if self._held:
                    self.server.budget.release(self._held)
                    self._held = 0
        except _ClientGone:  # no one to answer (`RestServer.handle_error`)
            raise
        except ServingError as e:
            status, body = e.http_status, {"error": str(e)}
        except tf.errors.InvalidArgumentError as e:
            status, body = 400, {"error": e.message}
        except Exception as e:  # unexpected: logged, 500 to the client
            logging.exception("REST %s %s failed", method, self.path)
            status, body = 500, {"error": f"{type(e).__name__}: {e}"}
        if status >= 400:
            app.stats.add(**{f"rest_errors_{status}": 1})
        self._send(status, body)

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise LengthRequired("a Content-Length header is required")
        try:
            length = int(length)
        except ValueError:
            length = None
        if length is None or length < 0:
            self.close_connection = True
            raise InvalidArgument(f"Content-Length {self.headers.get('Content-Length')!r} is not a non-negative "
                                  "integer")
        limit = self.server.app.config.max_body_bytes
        if length > limit:
            self.close_connection = True  # the body is not read
            raise ResourceExhausted(f"request body of {length} bytes is over the limit of {limit} bytes")
        timeout = self.server.read_timeout_s
        if not self.server.budget.acquire(length, timeout):
            self.server.app.stats.add(rest_busy=1)
            self._drain(64 << 10)  # a small body is read and dropped (the connection stays usable), else closed
            raise Unavailable(f"server busy: request bodies of {self.server.budget.limit} bytes are in flight, "
                              f"{length} more did not fit within {timeout:g} s; retry later")
        self._held = length
        raw = self._read(length, timeout)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidArgument("request body is not valid JSON: arrays/objects nested too deeply") from None
        del raw
        if not isinstance(body, dict):
            raise InvalidArgument("request body must be a JSON object")
        return body

    def _route(self, method, app):
        path = self.path.split("?", 1)[0]
        if path == "/v1/stats" and method == "GET":
            return 200, app.stats_snapshot()
        m = _ROUTE.match(path)
        if m is None:
            if method == "POST":
                self._drain()
            raise NotFound(f"no route {method} {path}")
        name, version, verb, sub = m.group(1), _parse_version(m.group(2)), m.group(3), m.group(4)
        if verb is not None:
            if method != "POST":
                raise NotFound(f"{path} takes POST")
            body = self._body()
            if verb == "predict":
                signature = body.get("signature_name") or None
                if signature is not None and not isinstance(signature, str):
                    raise InvalidArgument("'signature_name' must be a string")
                model = app.model(name, version)
                sig = model.signature(signature)
                inputs, fmt = parse_predict_json(body, sig)
                model, _, outputs = app.in_model_thread(app.predict, inputs, name, version, signature, model=model)
                response = predict_json_response(outputs, fmt)
                response["model_version"] = str(model.version)
                return 200, response
            request = RankRequest.from_json(body)
            result = app.in_model_thread(app.rank_request, request, name, version)
            return 200, result.to_json(request.candidates, name)
        if method != "GET":
            self._drain()
            raise NotFound(f"{path} takes GET")
        if sub == "metadata":
            model, defs = app.metadata(name, version)
            return 200, {
                "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
                "metadata": {"signature_def": {"signature_def": {
                    k: json_format.MessageToDict(v) for k, v in defs.items()}}},
            }
        return 200, {"model_version_status": [
            {"version": str(s["version"]), "state": s["state"],
             "status": {"error_code": s.get("code") or ("UNKNOWN" if s["error"] else "OK"),
                        "error_message": s["error"]}}
            for s in app.status(name, version)]}

    def _read(self, length, timeout):
        """The `length` bytes of a request body, within `timeout` s (408 otherwise); `_ClientGone` if the client
        closed or reset the connection first."""
        self._reader.deadline = time.monotonic() + timeout
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise RequestTimeout(f"the request body ({length} bytes) did not arrive within {timeout:g} s") from None
        except ConnectionError as e:
            raise _ClientGone(f"{type(e).__name__} while reading the request body: {e}") from None
        if len(raw) < length:
            raise _ClientGone(f"the request body ended after {len(raw)} of {length} bytes")
        return raw

    def _drain(self, limit=1 << 20):
        """Reads (and drops) a request body of at most `limit` bytes so the connection stays usable; closes it
        otherwise."""
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            length = -1
        if 0 <= length <= limit:
            self._read(length, self.server.read_timeout_s)
        else:
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def send_error(self, code, message=None, explain=None):  # malformed HTTP itself: JSON error, then close
        self.close_connection = True
        try:
            self._send(code, {"error": message or explain or "bad request"})
        except OSError:
            pass


class _ClientGone(ConnectionError):
    """The client closed or reset its connection mid-request: nothing is sent back."""


class LengthRequired(ServingError):
    grpc_code = "INVALID_ARGUMENT"
    http_status = 411


class RequestTimeout(ServingError):
    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 408


class RestServer(ThreadingHTTPServer):
    """The HTTP server: `ThreadingHTTPServer` that tracks its connections for a graceful stop.

    Args:
        app: the `mm_ads.serving.server.prediction_server.PredictionServer`.
        host, port: where to bind (port 0: any free port; `server_port` tells which).
        max_connections: open connections (one thread each); more are closed at once.
        max_inflight_bytes: request bodies being read or handled at once, over all connections.
        read_timeout_s: deadline of a request's line and headers (and of an idle connection), then of its body.
    """

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, app, host, port, max_connections=256, max_inflight_bytes=128 << 20, read_timeout_s=5.0):
        self.app = app
        self.max_connections = int(max_connections)
        self.budget = _ByteBudget(max_inflight_bytes)
        self.read_timeout_s = float(read_timeout_s)
        self._refused_logged = None  # when the last "refusing" warning was logged (one per 10 s at most)
        self.stopping = threading.Event()
        self._conns = {}
        self._conns_lock = threading.Lock()
        self._thread = None
        super().__init__((host, port), _Handler)

    def track(self, handler, busy):
        with self._conns_lock:
            self._conns[handler] = busy

    def verify_request(self, request, client_address):
        """Refuses (closes) a new connection when `max_connections` are open: one thread each."""
        with self._conns_lock:
            ok = len(self._conns) < self.max_connections
        if not ok:
            self.app.stats.add(rest_connections_refused=1)
            now = time.monotonic()
            if self._refused_logged is None or now - self._refused_logged >= 10:
                self._refused_logged = now
                logging.warning("REST: %d connections open, refusing %s (logged once per 10 s; the count is "
                                "rest_connections_refused in /v1/stats)", self.max_connections, client_address)
        return ok

    def handle_error(self, request, client_address):
        """An exception out of a connection's handler: a client that went away is one DEBUG line, no traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.app.stats.add(rest_disconnects=1)
            what = error if isinstance(error, _ClientGone) else f"{type(error).__name__}: {error}"
            logging.debug("REST: client %s went away: %s", client_address, what)
        else:
            logging.exception("REST: connection from %s failed", client_address)

    def untrack(self, handler):
        with self._conns_lock:
            self._conns.pop(handler, None)

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="rest-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stops accepting, closes idle keep-alive connections, waits for requests in progress."""
        self.stopping.set()
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        with self._conns_lock:
            for handler, busy in self._conns.items():
                if not busy:
                    try:
                        handler.connection.shutdown(socket.SHUT_RD)
                    except OSError:
                        pass
        self.server_close()  # joins the connection threads (block_on_close)

