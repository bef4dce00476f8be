"""A private `redis-server` on 127.0.0.1 for tests, benchmarks and the local demo.

`local_redis_server()` starts the binary on a random free port with its own temporary directory and no
persistence (`--save '' --appendonly no`), waits until it answers PING, yields `redis://127.0.0.1:PORT/0`,
and always kills it and removes the directory. `connect()` opens a `redis://` URI of the Redis backends;
`redact_uri()` is what logs, errors and written files show of one (its password replaced by `***`).
"""

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse


class RedisUnavailable(RuntimeError):
    """No `redis-server` binary or no redis-py."""


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_uri(uri):
    """`uri` without its credentials, for logs, error messages and files.

    `redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0`; `redis://:secret@host/0` →
    `redis://:***@host/0`; user info without a colon (`redis://secret@host`) is replaced whole (`***@`); a
    `password=` query parameter becomes `password=***`. A path or a URI without credentials is returned unchanged.
    A list of several modalities' tables (`image=redis://...,text=redis://...`) has every entry redacted.
    """
    text = str(uri)
    if "," in text or _MODALITY_ENTRY.match(text):
        return ",".join(m.group(1) + _redact_one(m.group(2)) if (m := _MODALITY_ENTRY.match(part)) else
                        _redact_one(part) for part in text.split(","))
    return _redact_one(text)


_MODALITY_ENTRY = re.compile(r"^([a-z][a-z0-9_]{0,31}=)(.*)$", re.DOTALL)


def _redact_one(text):
    def userinfo(m):
        user, colon, _ = m.group(2).partition(":")
        return m.group(1) + (f"{user}:***" if colon else "***") + "@"

    return _PASSWORD_PARAM.sub(r"\1***", _USERINFO.sub(userinfo, text, count=1))


def connect(uri, key, default, what, client=None):
    """`redis://host:port/db?<key>=NAME` → (a redis-py client, NAME or `default`).

    `what` names the caller in the error raised when redis-py is missing; `client` replaces the one built here.
    """
    try:
        import redis
    except ImportError as e:
        raise ImportError(f"{what} needs redis-py: pip install 'mm_ads[serving]'") from e
    parsed = urllib.parse.urlsplit(uri)
    name = urllib.parse.parse_qs(parsed.query).get(key, [default])[0]
    base = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path, "", ""))
    return client or redis.Redis.from_url(base), name


def _free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_redis_server(extra_args=(), attempts=5, startup_timeout_s=10.0):
    """Yields the base URL of a fresh redis-server; raises `RedisUnavailable` when it cannot run here."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable("redis-server is not installed (apt-get install redis-server)")
    try:
        import redis
    except ImportError:
        raise RedisUnavailable("redis-py is not installed (pip install 'mm_ads[serving]')") from None
    workdir = tempfile.mkdtemp(prefix="mm_ads_redis_")
    proc = None
    try:
        for _ in range(attempts):  # another process may take the free port between probing and binding
            port = _free_port()
            proc = subprocess.Popen(
                [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", workdir, "--save", "",
                 "--appendonly", "no", *extra_args],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + startup_timeout_s
            try:
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        client.ping()
                        break
                    except redis.ConnectionError:
                        time.sleep(0.02)
            finally:
                client.close()
            if proc.poll() is None:
                break
            proc = None
        if proc is None:
            raise RuntimeError(f"redis-server did not start on a free port in {attempts} attempts")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
