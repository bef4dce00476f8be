r"""The online system in one command: encoder service, index table, near-line trainer and prediction server.

`python -m tools.online_demo [--work_dir=runs/online_demo] [--duration_s=60] [--new_item_rates=5]`

**Preparation** (each stage is skipped when its output is already in `--work_dir`; delete it for a fresh start):

1. a small world: `mm_ads.data.synthetic` with `--world_flagfile` into `<work>/data` (or `--data_dir`);
2. an SCL text encoder: a short run of the repository's trainer (`--scl_flagfile`, `--scl_steps`) exported as the
   encoder SavedModel `<work>/scl/export/<version>/` (or `--encoder_export`: an existing export);
3. the catalogue's vectors through that SavedModel (the encoder service's own code path, so batch and online
   vectors are the same function of the title) → `<work>/vectors/catalogue.parquet`;
4. the initial CTR model: a short offline run of `--ctr_flagfile` (simtier) on those vectors → version 1 of its
   TF-Serving base path.

**The loop** (a fresh `<work>/online/` per run): the index table `online/index.db` is bulk-loaded with the
catalogue's vectors and version 1 is copied to the served base path `online/models/ctr/1`; then three
services start as separate processes, each its own entry point with its flagfile:

```
new items ─► online/items.log ─► encoder service ─► index.db ◄── ranking ── prediction server ◄── rank calls
                                                       │                     ▲ (gRPC + REST)     (measuring
impressions ─► online/impressions.log ─► near-line trainer (joins vectors) ──┘ new versions       client)
 (replayed from the dataset)                            exports online/models/ctr/<v>/ → hot swap
```

This process plays the world around them: it replays the dataset's impressions (`mm_ads.serving.nearline.replay`,
`--impression_rate`), creates brand-new items (ids not in the catalogue, with titles made from the world's
attribute words) at a steady `--new_item_rates` for `--duration_s` each, and measures **freshness**: the time
from a new-item event's creation (its `ts`) to the first ids-only ranking response of the server
(`POST /v1/models/ctr:rank`) whose `found` mask shows that item's vector. The measuring client sends a rank call
every `--poll_interval_ms` (from `--poll_clients` threads calling in turn, so a slow call does not delay the
next one) with every new item not yet found among its candidates. Freshness splits into

* **encoder** — the vector's write timestamp in the index table (taken by `put_many` just before its
  transaction) − the event's `ts`: the encoder service's tail poll, micro-batch wait and encoder call;
* **poll wait** — the first rank call sent after that timestamp − the timestamp: the measuring client's
  resolution (about uniform in `[0, poll interval)`), not a property of the system;
* **visibility** — the rank call that found the item − the first call sent after the timestamp (> 0 when
  calls sent after it still missed the vector: the table's commit, an fsync of SQLite's WAL, was not done
  when the server read; it then also holds the time until the next call was sent);
* **response** — that call's round trip.

The measured freshness is an upper bound of the true one by at most one poll interval plus a round trip; the
lower bound (the last call that missed the item) is reported too. The demo prints freshness p50/p99 per rate,
the encoder service's own lag, the versions the near-line trainer exported and those the server answered with
(hot swaps), and a few ranked responses; then it stops every service with SIGTERM and waits for it. The exit
code is 1 when a service failed to start, died, did not stop cleanly, or a new item was never found. A JSON
summary goes to `<work>/online/summary.json`; the services' logs to `<work>/online/logs/`.

Why processes and not threads: the services are the production programs (`python -m mm_ads.serving.*` with
their flagfiles), so the demo exercises their real start-up, signal handling and exit codes; three TensorFlow
runtimes do not share one GIL with the measuring client (a thread's pause would show up as freshness); and a
clean shutdown is checked, not assumed (every child has exited with code 0 and none is left).

`tools/bench/freshness.py` runs the same loop at several rates and adds a baseline (the bare encoder call).
"""

import dataclasses
import http.client
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_ITEM_ID_BASE = 1_000_000_000  # brand-new item ids: far above any catalogue id of the synthetic worlds
MODEL_NAME = "ctr"


@dataclasses.dataclass
class DemoConfig:
    """What the demo runs (the flags of the same names; see `define_flags`)."""

    work_dir: str = "runs/online_demo"
    data_dir: str = ""
    world_flagfile: str = "configs/data/smoke.flags"
    encoder_export: str = ""
    scl_flagfile: str = "configs/scl/smoke_text.flags"
    scl_steps: int = 150
    ctr_flagfile: str = "configs/ctr/simtier.flags"
    ctr_steps: int = 0
    duration_s: float = 45.0
    new_item_rates: tuple = (5.0,)
    settle_s: float = 15.0
    hot_swap_timeout_s: float = 60.0
    impression_rate: float = 100.0
    impression_split: str = "train"
    poll_interval_ms: float = 50.0
    poll_clients: int = 2
    nearline_batch_size: int = 256
    nearline_export_every_s: float = 15.0
    server_poll_interval_s: float = 0.5
    encoder_max_wait_ms: int = -1
    grpc_port: int = 0
    rest_port: int = 0
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 120.0
    num_ranked_examples: int = 3
    seed: int = 0

    def validate(self):
        if not self.work_dir:
            raise ValueError("--work_dir is required")
        if not self.new_item_rates or any(r <= 0 for r in self.new_item_rates):
            raise ValueError(f"--new_item_rates must be positive events/s, got {list(self.new_item_rates)}")
        for name in ("duration_s", "poll_interval_ms", "startup_timeout_s", "stop_timeout_s",
                     "nearline_export_every_s", "server_poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("settle_s", "hot_swap_timeout_s", "impression_rate", "scl_steps", "ctr_steps",
                     "num_ranked_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.poll_clients < 1:
            raise ValueError(f"--poll_clients must be >= 1, got {self.poll_clients}")
        if self.nearline_batch_size < 1:
            raise ValueError(f"--nearline_batch_size must be >= 1, got {self.nearline_batch_size}")
        for name in ("grpc_port", "rest_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"--{name} must be a port (0 = any free port), got {getattr(self, name)}")
        return self


class DemoError(RuntimeError):
    """A service failed (did not start, died, or did not stop cleanly)."""


# -- preparation ---------------------------------------------------------------------------------------------
def _stage(name, fn):
    start = time.monotonic()
    out = fn()
    logging.warning("prepare: %s (%.1f s)", name, time.monotonic() - start)
    return out


def prepare(cfg):
    """Builds (or reuses) the world, the encoder export, the catalogue vectors and the offline CTR model.

    Returns `{"data_dir", "encoder", "vectors", "ctr_model_dir", "ctr_export", "seconds"}`.
    """
    from mm_ads import config as config_lib
    from mm_ads import runs
    from mm_ads.export.saved_model import latest_version
    from mm_ads.serving.index.encoder_service import ExportedEncoder, resolve_saved_model
    from mm_ads.training import model_dir as run_dir

    start = time.monotonic()
    work = os.path.abspath(cfg.work_dir)
    os.makedirs(work, exist_ok=True)
    data_dir = os.path.abspath(cfg.data_dir) if cfg.data_dir else os.path.join(work, "data")
    if not os.path.exists(os.path.join(data_dir, "manifest.json")):
        if cfg.data_dir:
            raise FileNotFoundError(f"--data_dir={cfg.data_dir} has no manifest.json: not a dataset")
        from mm_ads.data import synthetic

        world = synthetic.world_config_from_flagfile(_repo_path(cfg.world_flagfile))
        _stage(f"world {cfg.world_flagfile} → {data_dir}",
               lambda: synthetic.generate(world, data_dir, progress=False))

    if cfg.encoder_export:
        encoder_path = resolve_saved_model(os.path.abspath(cfg.encoder_export))
    else:
        scl_dir = os.path.join(work, "scl")
        if not latest_version(os.path.join(scl_dir, "export")):
            scl = config_lib.config_from_flagfile(_repo_path(cfg.scl_flagfile), data_dir=data_dir,
                                                  model_dir=scl_dir, max_steps=cfg.scl_steps, seed=cfg.seed)
            _stage(f"SCL text encoder ({cfg.scl_flagfile}, {cfg.scl_steps} steps) → {scl_dir}",
                   lambda: runs.run(scl))
        encoder_path = resolve_saved_model(os.path.join(scl_dir, "export"))

    encoder = ExportedEncoder(encoder_path)
    if encoder.modality != "text":
        raise ValueError(f"{encoder_path}: the demo creates new items with titles and needs a text encoder, "
                         f"this one takes {encoder.modality!r}")
    vectors = os.path.join(work, "vectors", f"catalogue-{encoder.encoder_version}.parquet")
    if not os.path.exists(vectors):
        _stage(f"catalogue vectors ({encoder.encoder_version}) → {vectors}",
               lambda: encode_catalogue(encoder, data_dir, vectors))

    flagfile_name = os.path.splitext(os.path.basename(cfg.ctr_flagfile))[0]
    ctr_dir = os.path.join(work, f"ctr-{flagfile_name}-{encoder.encoder_version}")
    if run_dir.finished_metrics(ctr_dir) is None:
        ctr = config_lib.config_from_flagfile(_repo_path(cfg.ctr_flagfile), data_dir=data_dir, model_dir=ctr_dir,
                                              vector_table=vectors, max_steps=cfg.ctr_steps, seed=cfg.seed)
        if ctr.task != "ctr" or not ctr.model.uses_vectors or ctr.model.pretrains_make:
            raise ValueError(f"--ctr_flagfile={cfg.ctr_flagfile}: the demo needs a CTR variant that reads the "
                             "multimodal vectors and needs no MAKE pre-training (e.g. simtier, simscore, vector)")
        _stage(f"CTR model ({cfg.ctr_flagfile}) → {ctr_dir}", lambda: runs.run(ctr))
    ctr_export = os.path.join(ctr_dir, "export")
    if not latest_version(ctr_export):
        raise FileNotFoundError(f"{ctr_export}: the offline CTR run exported no version")
    return {"data_dir": data_dir, "encoder": encoder_path, "encoder_version": encoder.encoder_version,
            "dim": encoder.dim, "vectors": vectors, "ctr_model_dir": ctr_dir,
            "ctr_export": os.path.join(ctr_export, str(latest_version(ctr_export))),
            "seconds": round(time.monotonic() - start, 1)}


def encode_catalogue(encoder, data_dir, output, batch_size=256):
    """Encodes `<data_dir>/items.parquet` titles with an `ExportedEncoder` → a vector table at `output`."""
    import pyarrow.parquet as pq

    from mm_ads.data.vectors import write_vector_table

    path = os.path.join(data_dir, "items.parquet")
    items = pq.read_table(path, columns=["item_id", "title"]).to_pydict()
    titles = [t.encode("utf-8") for t in items["title"]]
    if not titles:
        raise ValueError(f"{path} has no items")
    vecs = np.concatenate([encoder.encode(titles[i:i + batch_size]) for i in range(0, len(titles), batch_size)])
    write_vector_table(output, np.asarray(items["item_id"], np.int64), vecs, encoder.encoder_version,
                       source=f"tools.online_demo: {encoder.path}")
    return len(titles)


def _repo_path(path):
    return path if os.path.isabs(path) else os.path.join(REPO, path)


# -- the world around the services: new items, requests ------------------------------------------------------
class World:
    """The catalogue (item-side features, attributes), users with histories, and brand-new items with titles."""

    def __init__(self, data_dir, seed=0):
        import pyarrow.parquet as pq

        from mm_ads.data.dataset import Manifest

        self.spec = Manifest.load(data_dir).spec
        self.items = pq.read_table(os.path.join(data_dir, "items.parquet"),
                                   columns=["item_id", "category_id", "brand_id", "colour", "pattern", "material",
                                            "size"]).to_pydict()
        self.items = {k: np.asarray(v, np.int64) for k, v in self.items.items()}
        if NEW_ITEM_ID_BASE <= int(self.items["item_id"].max()):
            raise ValueError(f"{data_dir}: catalogue ids reach {int(self.items['item_id'].max())}; the demo's new "
                             f"item ids start at {NEW_ITEM_ID_BASE}")
        self.rng = np.random.default_rng(seed)
        self.item_side = [f.name for f in self.spec.by_role("item") if f.name != "item_id"]
        self.request_side = [f.name for f in self.spec if f.role in ("user", "context")]
        self.users = self._users(data_dir)
        self._next_id = NEW_ITEM_ID_BASE

    def _users(self, data_dir, limit=64):
        from mm_ads.data.spec import HIST_ITEM_ID
        from mm_ads.serving.nearline.replay import impression_rows

        users = []
        for rows in impression_rows(data_dir, "test", batch_size=limit, limit=limit):
            for i in range(len(rows[HIST_ITEM_ID])):
                hist = rows[HIST_ITEM_ID][i]
                users.append({"features": {n: int(rows[n][i]) for n in self.request_side},
                              "history": [int(h) for h in hist[hist != 0]]})
        if not users:
            raise ValueError(f"{data_dir}: no test impressions to take users and histories from")
        return users

    def new_items(self, n):
        """`n` brand-new items: a catalogue item's attributes with one of colour/pattern/material changed,
        a title rendered from them (`mm_ads.data.render.make_titles`), and an id not in the catalogue."""
        from mm_ads.data import render

        rows = self.rng.integers(0, len(self.items["item_id"]), n)
        attrs = {k: self.items[k][rows].copy() for k in ("category_id", "brand_id", "colour", "pattern",
                                                           "material", "size")}
        sizes = {"colour": len(render.COLOURS), "pattern": len(render.PATTERNS), "material": len(render.MATERIALS)}
        for i, which in enumerate(self.rng.choice(list(sizes), n)):
            attrs[which][i] = self.rng.integers(0, sizes[which])
        titles = render.make_titles(attrs["category_id"], attrs["colour"], attrs["pattern"], attrs["material"],
                                    attrs["size"], attrs["brand_id"], self.rng)
        out = []
        for i in range(n):
            self._next_id += 1
            out.append({"item_id": self._next_id, "title": titles[i],
                        **{k: int(attrs[k][i]) for k in self.item_side if k in attrs}})
        return out

    def catalogue_rows(self, n):
        rows = self.rng.choice(len(self.items["item_id"]), n, replace=False)
        return [{"item_id": int(self.items["item_id"][r]), **{k: int(self.items[k][r]) for k in self.item_side}}
                for r in rows]

    def rank_body(self, new, catalogue, user):
        """A rank request (REST JSON): candidates = catalogue items + new items, their item-side features."""
        cands = list(catalogue) + list(new)
        return {"candidates": [c["item_id"] for c in cands], "history": user["history"],
                "features": user["features"],
                "candidate_features": {k: [c.get(k, 0) for c in cands] for k in self.item_side}}


class RestClient:
    """One keep-alive HTTP/1.1 connection to the server's REST port."""

    def __init__(self, port, timeout=30.0):
        self.port, self.timeout = port, timeout
        self.conn = None

    def request(self, method, path, body=None):
        """→ (status, JSON body); reconnects once after a dropped connection."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                data = None if body is None else json.dumps(body)
                self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
                resp = self.conn.getresponse()
                return resp.status, json.loads(resp.read() or b"null")
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def rank(self, body):
        status, out = self.request("POST", f"/v1/models/{MODEL_NAME}:rank", body)
        if status != 200:
            raise DemoError(f"rank call failed: HTTP {status}: {out}")
        return out

    def close(self):
        if self.conn is not None:
            self.conn.close()


# -- the services --------------------------------------------------------------------------------------------
class Service:
    """One service process: `python -m <module> <args>`, stderr to `<logs>/<name>.log`, stdout to
    `<logs>/<name>.out` (or a pipe for the server, whose first stdout line gives its ports)."""

    def __init__(self, name, module, args, log_dir, pipe_stdout=False):
        self.name, self.module, self.args = name, module, list(args)
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.out_path = os.path.join(log_dir, f"{name}.out")
        self.pipe_stdout = pipe_stdout
        self.proc = None
        self.returncode = None
        self.stopped_by_us = False
        self.failure = None

    def start(self):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), PYTHONUNBUFFERED="1")
        with open(self.log_path, "w") as err:
            out = subprocess.PIPE if self.pipe_stdout else open(self.out_path, "w")  # noqa: SIM115
            try:
                self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], cwd=REPO, env=env,
                                             stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True)
            finally:
                if out is not subprocess.PIPE:
                    out.close()
        logging.warning("started %s (pid %d): python -m %s %s", self.name, self.proc.pid, self.module,
                        " ".join(self.args))
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def read_line(self, deadline):
        """The first stdout line (the server's ports), or None when the process exits or the deadline passes."""
        buf = ""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 4096).decode()
                if not chunk:
                    return None
                buf += chunk
                if "\n" in buf:
                    return buf.split("\n", 1)[0]
            elif self.proc.poll() is not None:
                return None
        return None

    def log_tail(self, lines=15):
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout, aborting=False):
        """SIGTERM, wait up to `timeout`, SIGKILL after that (a failure); returns the exit code.

        `aborting`: the run already failed elsewhere; a service still starting up then dies of the SIGTERM
        before it installed its handler (exit code -15), which is not a failure of its own.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.stopped_by_us = True
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.failure = self.failure or f"did not stop within {timeout:.0f} s of SIGTERM: killed"
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.returncode != 0 and self.failure is None and not (aborting and self.returncode == -signal.SIGTERM):
            self.failure = f"exited with code {self.returncode}"
        return self.returncode

    def stdout_json(self):
        """The last JSON line the service printed on stdout (its final stats), or None."""
        try:
            with open(self.out_path) as f:
                lines = [line for line in f if line.startswith("{")]
            return json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            return None


def service_commands(cfg, prep, online):
    """(name, module, args) of the three services on the prepared artifacts and the run's `online` dir."""
    index = os.path.join(online, "index.db")
    return [
        ("encoder_service", "mm_ads.serving.index.encoder_service", [
            "--flagfile=configs/serving/encoder_service.flags", f"--encoder={prep['encoder']}",
            f"--events={os.path.join(online, 'items.log')}", f"--index_table={index}", "--log_every_s=5",
            *([f"--max_wait_ms={cfg.encoder_max_wait_ms}"] if cfg.encoder_max_wait_ms >= 0 else [])]),
        ("nearline", "mm_ads.serving.nearline", [
            "--flagfile=configs/serving/nearline.flags", f"--flagfile={_repo_path(cfg.ctr_flagfile)}",
            f"--data_dir={prep['data_dir']}", f"--model_dir={os.path.join(online, 'nearline')}",
            f"--init_model_dir={prep['ctr_model_dir']}", f"--stream={os.path.join(online, 'impressions.log')}",
            f"--index_table={index}", f"--export_base={os.path.join(online, 'models', MODEL_NAME)}",
            f"--batch_size={cfg.nearline_batch_size}", f"--export_every_s={cfg.nearline_export_every_s}",
            "--max_batch_delay_s=1", "--stats_every_s=5", "--checkpoint_every=1000000"]),
        ("server", "mm_ads.serving.server", [
            "--flagfile=configs/serving/server.flags",
            f"--model_base_path={os.path.join(online, 'models', MODEL_NAME)}",
            f"--data_dir={prep['data_dir']}", f"--index_table={index}", f"--grpc_port={cfg.grpc_port}",
            f"--rest_port={cfg.rest_port}", f"--model_name={MODEL_NAME}",
            f"--poll_interval_s={cfg.server_poll_interval_s}"]),
    ]


def prepare_online_dir(prep, online):
    """A fresh run dir: the index table with the catalogue's vectors, version 1 under the served base path."""
    from mm_ads.serving.index.index_table import load_vector_table_into, open_index_table

    if os.path.exists(online):
        shutil.rmtree(online)
    os.makedirs(os.path.join(online, "logs"))
    os.makedirs(os.path.join(online, "models", MODEL_NAME))
    with open_index_table(os.path.join(online, "index.db"), dim=prep["dim"], encoder_version=prep["encoder_version"],
                          create=True) as table:
        n = load_vector_table_into(table, prep["vectors"])
    tmp = os.path.join(online, "models", MODEL_NAME, ".1.tmp")
    shutil.copytree(prep["ctr_export"], tmp)
    os.rename(tmp, os.path.join(online, "models", MODEL_NAME, "1"))  # the server never sees a partial version
    return n


# -- the run -------------------------------------------------------------------------------------------------
class Loop:
    """The running services plus the producer and measuring-client threads of one demo run."""

    def __init__(self, cfg, prep, online):
        from mm_ads.serving.index.events import EventLog

        self.cfg, self.prep, self.online = cfg, prep, online
        self.world = World(prep["data_dir"], cfg.seed)
        self.items_log = EventLog(os.path.join(online, "items.log"))
        self.impressions_log = EventLog(os.path.join(online, "impressions.log"))
        self.services = [Service(n, m, a, os.path.join(online, "logs"), pipe_stdout=(n == "server"))
                         for n, m, a in service_commands(cfg, prep, online)]
        self.server = self.services[-1]
        self.ports = None
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.created = {}    # item id → {"ts", "phase", ...}
        self.pending = {}    # item id → the new item, until a rank response found it
        self.found = {}      # item id → {"send", "recv", "version"}
        self.last_miss = {}  # item id → send time of the last rank call that did not find it
        self.sends = []      # send times of every rank call
        self.versions_seen = {}  # model version → first time a response came from it
        self.polls = 0
        self.errors = []
        self.threads = []
        self.replayed = 0
        self.phase = None
        self.catalogue_filler = self.world.catalogue_rows(4)

    # services -----------------------------------------------------------------------------------------------
    def start_services(self):
        for s in self.services:
            s.start()
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        line = self.server.read_line(deadline)
        if line is None:
            self.server.failure = ("did not start (no ports line within the start-up timeout)" if self.server.alive()
                                   else f"exited with code {self.server.proc.poll()} during start-up")
            raise DemoError(f"server {self.server.failure}:\n{self.server.log_tail()}")
        self.ports = json.loads(line)
        logging.warning("server ready: gRPC 127.0.0.1:%s, REST 127.0.0.1:%s", self.ports["grpc_port"],
                        self.ports["rest_port"])
        self.check_services()

    def check_services(self):
        for s in self.services:
            if s.proc is not None and s.proc.poll() is not None and not s.stopped_by_us:
                s.failure = s.failure or f"exited with code {s.proc.returncode} while running"
                raise DemoError(f"{s.name} {s.failure}:\n{s.log_tail()}")

    def stop_services(self, aborting=False):
        # the server first (no more calls to answer), then the consumers of the streams (the near-line
        # trainer checkpoints and exports on SIGTERM)
        for s in [self.server] + self.services[:-1]:
            s.stop(self.cfg.stop_timeout_s, aborting)

    # threads ------------------------------------------------------------------------------------------------
    def _thread(self, name, fn, *args):
        def body():
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                logging.exception("%s failed", name)
                self.errors.append(f"{name}: {type(e).__name__}: {e}")
                self.stop_event.set()

        t = threading.Thread(target=body, name=name, daemon=False)
        t.start()
        self.threads.append(t)

    def start_threads(self):
        if self.cfg.impression_rate > 0:
            self._thread("impression-replay", self._replay_impressions)
        for k in range(self.cfg.poll_clients):
            self._thread(f"rank-client-{k}", self._client, k)

    def _replay_impressions(self):
        from mm_ads.serving.nearline.replay import replay

        while not self.stop_event.is_set():  # the split over and over, until the run ends
            out = replay(self.prep["data_dir"], self.impressions_log, split=self.cfg.impression_split,
                         rate=self.cfg.impression_rate, stop_event=self.stop_event)
            self.replayed += out["events"]
            if not out["events"] and not self.stop_event.is_set():  # (stopped before its first chunk: fine)
                raise ValueError(f"{self.prep['data_dir']}: the {self.cfg.impression_split!r} split has no "
                                 "impressions to replay")

    def create_items(self, n, phase):
        items = self.world.new_items(n)
        now = time.time()
        records = [{"type": "item", "item_id": it["item_id"], "title": it["title"], "ts": now} for it in items]
        with self.lock:
            for it in items:
                self.created[it["item_id"]] = {**it, "ts": now, "phase": phase}
                self.pending[it["item_id"]] = self.created[it["item_id"]]
        self.items_log.append(records)
        return items

    def produce(self, rate, duration, phase):
        """New items at a steady `rate` for `duration` seconds, one event per append (one fsync each)."""
        start = time.monotonic()
        k = 0
        while not self.stop_event.is_set():
            due = start + k / rate
            if due - start >= duration:
                break
            wait = due - time.monotonic()
            if wait > 0 and self.stop_event.wait(wait):
                break
            self.create_items(1, phase)
            k += 1
        return k

    def wait_found(self, ids, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop_event.is_set():
            with self.lock:
                if not any(i in self.pending for i in ids):
                    return True
            self.check_services()
            time.sleep(0.05)
        with self.lock:
            return not any(i in self.pending for i in ids)

    def nearline_versions(self):
        """Versions the near-line trainer exported so far (its `exports.json`)."""
        path = os.path.join(self.online, "nearline", "exports.json")
        if not os.path.exists(path):
            return set()
        with open(path) as f:
            return {e["version"] for e in json.load(f)}

    def wait_hot_swap(self, timeout):
        """Waits until a rank response came from a version the near-line trainer exported (the server swapped
        it in); returns the seconds waited, or None when none was served within `timeout`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout and not self.stop_event.is_set():
            with self.lock:
                seen = set(self.versions_seen)
            if seen & self.nearline_versions():
                return round(time.monotonic() - start, 2)
            self.check_services()
            time.sleep(0.1)
        logging.warning("no version of the near-line trainer was served within %.0f s", timeout)
        return None

    def _client(self, k):
        """Measuring client `k` of `poll_clients`: a rank call every `poll_clients × poll_interval_ms` (jittered),
        so that together they call every `poll_interval_ms` and a slow call does not hold the others back."""
        client = RestClient(self.ports["rest_port"])
        n = self.cfg.poll_clients
        interval = n * self.cfg.poll_interval_ms / 1000.0
        user = self.world.users[0]
        rng = np.random.default_rng(self.cfg.seed + 1 + k)
        try:
            next_send = time.monotonic() + k * interval / n
            while not self.stop_event.is_set():
                with self.lock:
                    new = list(self.pending.values())[: 1000 - len(self.catalogue_filler)]
                body = self.world.rank_body(new, self.catalogue_filler, user)
                send = time.time()
                out = client.rank(body)
                recv = time.time()
                version = int(out["model_version"])
                found = out["found"][len(self.catalogue_filler):]
                with self.lock:
                    self.sends.append(send)
                    self.polls += 1
                    self.versions_seen.setdefault(version, recv)
                    for it, ok in zip(new, found):  # calls overlap: keep the first finding response
                        i = it["item_id"]
                        if ok and (i not in self.found or recv < self.found[i]["recv"]):
                            self.found[i] = {"send": send, "recv": recv, "version": version}
                            self.pending.pop(i, None)
                        elif not ok:
                            self.last_miss[i] = max(send, self.last_miss.get(i, send))
                # jittered period: the calls must not phase-lock with the steady new-item events (the poll
                # wait would then be a constant instead of the uniform [0, interval) a resolution bound assumes)
                next_send += interval * rng.uniform(0.5, 1.5)
                pause = next_send - time.monotonic()
                if pause > 0:
                    self.stop_event.wait(pause)
                else:
                    next_send = time.monotonic()
        finally:
            client.close()

    def stop_threads(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(60)
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            self.errors.append(f"threads did not stop: {alive}")

    def ranked_examples(self, n):
        """`n` rank calls for real users: 6 catalogue items + 2 of the newest new items each."""
        client = RestClient(self.ports["rest_port"])
        out = []
        try:
            with self.lock:
                newest = sorted(self.found, reverse=True)[:2]
            for user in self.world.users[1:1 + n]:
                new = [self.created[i] for i in newest]
                body = self.world.rank_body(new, self.world.catalogue_rows(6), user)
                resp = client.rank(body)
                out.append({"user_id": user["features"].get("user_id"), "history_length": len(user["history"]),
                            "model_version": int(resp["model_version"]), "candidates": body["candidates"],
                            "scores": resp["scores"], "found": resp["found"], "ranking": resp["ranking"]})
            if out:
                out[-1]["grpc_max_abs_diff"] = self.grpc_rank_check(body, resp)
        finally:
            client.close()
        return out

    def grpc_rank_check(self, body, rest_response):
        """The same rank call through gRPC with TF Serving's official client (`PredictionService/Predict`,
        `signature_name="rank"`, ids only); returns the largest score difference to the REST response."""
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL_NAME
        request.model_spec.signature_name = "rank"
        request.model_spec.version.value = int(rest_response["model_version"])
        from mm_ads.data.spec import HIST_ITEM_ID, ITEM_ID

        inputs = {ITEM_ID: np.asarray(body["candidates"], np.int64),
                  HIST_ITEM_ID: np.asarray(body["history"], np.int64),
                  **{k: np.int64(v) for k, v in body["features"].items()},
                  **{k: np.asarray(v, np.int64) for k, v in body["candidate_features"].items()}}
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        with grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc_port']}") as channel:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        scores = tf.make_ndarray(response.outputs["ctr"]).reshape(-1)
        found = tf.make_ndarray(response.outputs["found"]).reshape(-1)
        if list(found) != list(rest_response["found"]):
            raise DemoError(f"gRPC and REST rank calls disagree on the found mask: {list(found)} vs "
                            f"{rest_response['found']}")
        return float(np.max(np.abs(scores - np.asarray(rest_response["scores"], np.float32))))


# -- measurement ---------------------------------------------------------------------------------------------
def _percentiles(values):
    v = np.asarray(values, np.float64)
    if not len(v):
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    return {"n": int(len(v)), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
            "max": float(v.max()), "mean": float(v.mean())}


def freshness_report(created, found, last_miss, sends, commit_ts):
    """Per phase: freshness (upper and lower bound) and its split (see the module docstring).

    Args:
        created: item id → `{"ts", "phase", "rate"}` of the measured new items.
        found: item id → `{"send", "recv"}` of the first rank call whose `found` mask showed it.
        last_miss: item id → send time of the last rank call that did not find it.
        sends: send times of every rank call.
        commit_ts: item id → the index table's write timestamp of its vector (NaN when missing).

    Each found item's freshness is exactly encoder + poll wait + visibility + response.
    """
    sends = np.sort(np.asarray(sends, np.float64))
    phases = {}
    for item_id, it in created.items():
        phases.setdefault(it["phase"], []).append(item_id)
    out = []
    for phase, ids in phases.items():
        fresh, lower, enc, wait, vis, resp = [], [], [], [], [], []
        missing = [i for i in ids if i not in found]
        for i in ids:
            if i not in found:
                continue
            ts, f = created[i]["ts"], found[i]
            fresh.append(f["recv"] - ts)
            lower.append(max(last_miss.get(i, ts), ts) - ts)
            c = commit_ts.get(i, float("nan"))
            if not np.isfinite(c):  # cannot happen for a found item unless the table lost it: no split
                continue
            enc.append(c - ts)
            # the call that found it may have been sent just before the write timestamp (the server read the
            # table after the commit): then there is no poll wait and its round trip counts from the timestamp
            first_after = min(sends[np.searchsorted(sends, c)] if sends[-1] >= c else np.inf, f["send"])
            first_after = max(first_after, c)
            wait.append(first_after - c)
            vis.append(max(f["send"], c) - first_after)
            resp.append(f["recv"] - max(f["send"], c))
        out.append({"phase": phase, "rate": created[ids[0]]["rate"], "items": len(ids), "found": len(ids) -
                    len(missing), "missing": missing[:20], "freshness_s": _percentiles(fresh),
                    "freshness_lower_bound_s": _percentiles(lower), "encoder_s": _percentiles(enc),
                    "poll_wait_s": _percentiles(wait), "visibility_s": _percentiles(vis),
                    "response_s": _percentiles(resp)})
    return out


def run(cfg):
    """Runs the demo; returns the summary dict (`summary["ok"]`: everything started, ran and stopped cleanly)."""
    cfg.validate()
    t0 = time.monotonic()
    prep = prepare(cfg)
    online = os.path.join(os.path.abspath(cfg.work_dir), "online")
    catalogue_rows = prepare_online_dir(prep, online)
    loop = Loop(cfg, prep, online)
    summary = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
               "prepare": prep, "index_table_rows_loaded": catalogue_rows, "errors": []}
    failed = None
    try:
        loop.start_services()
        summary["ports"] = loop.ports
        loop.start_threads()
        # warm-up: one new item through the whole path (encoder service, table, server), not measured
        warm = loop.create_items(1, "warm-up")
        loop.created[warm[0]["item_id"]]["rate"] = 0.0
        if not loop.wait_found([warm[0]["item_id"]], cfg.startup_timeout_s):
            loop.check_services()
            raise DemoError("; ".join(loop.errors) or "the warm-up item never reached a ranking response: see "
                            "online/logs/encoder_service.log")
        for k, rate in enumerate(cfg.new_item_rates):
            phase = f"phase {k + 1} ({rate:g}/s)"
            produced = loop.produce(rate, cfg.duration_s, phase)
            with loop.lock:
                ids = [i for i, it in loop.created.items() if it["phase"] == phase]
                for i in ids:
                    loop.created[i]["rate"] = rate
            loop.wait_found(ids, cfg.settle_s)
            loop.check_services()
            logging.warning("phase %d: %d new items at %g/s over %.0f s", k + 1, produced, rate, cfg.duration_s)
        if loop.errors:
            raise DemoError("; ".join(loop.errors))
        summary["hot_swap_wait_s"] = loop.wait_hot_swap(cfg.hot_swap_timeout_s)
        summary["ranked_examples"] = loop.ranked_examples(cfg.num_ranked_examples)
    except (DemoError, KeyboardInterrupt) as e:
        failed = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
    finally:
        loop.stop_threads()
        loop.stop_services(aborting=failed is not None)
        loop.items_log.close()
        loop.impressions_log.close()
    summary.update(_collect(loop, online))
    errors = list(loop.errors) + ([failed] if failed and failed != "; ".join(loop.errors) else [])
    errors += [f"{s.name}: {s.failure}" for s in loop.services if s.failure and s.failure not in str(failed)]
    missing = sum(len(p["missing"]) for p in summary.get("freshness", []))
    if not failed and missing:
        errors.append(f"{missing} new item(s) never appeared in a ranking response within --settle_s")
    summary["errors"] = errors
    summary["ok"] = not errors
    summary["seconds"] = round(time.monotonic() - t0, 1)
    from mm_ads.utils import io as io_utils

    io_utils.write_json(os.path.join(online, "summary.json"), summary)
    return summary


def _collect(loop, online):
    from mm_ads.serving.index.index_table import open_index_table

    out = {"services": {s.name: {"pid": s.pid, "returncode": s.returncode, "failure": s.failure,
                                 "log": s.log_path} for s in loop.services}}
    created = {i: it for i, it in loop.created.items() if it["phase"] != "warm-up"}
    commit = {}
    if created and os.path.exists(os.path.join(online, "index.db")):
        with open_index_table(os.path.join(online, "index.db")) as table:
            ids = np.asarray(list(created), np.int64)
            commit = dict(zip(created, table.timestamps(ids).tolist()))
    out["freshness"] = (freshness_report(created, loop.found, loop.last_miss, loop.sends, commit)
                        if created and loop.sends else [])
    out["items"] = [{"item_id": i, "phase": it["phase"], "ts": it["ts"], "commit": commit.get(i),
                     "found_send": loop.found.get(i, {}).get("send"), "found_recv": loop.found.get(i, {}).get("recv"),
                     "last_miss": loop.last_miss.get(i)} for i, it in created.items()]
    out["rank_calls"] = loop.polls
    out["impressions_replayed"] = loop.replayed
    out["versions_seen"] = sorted(loop.versions_seen)
    exports_path = os.path.join(online, "nearline", "exports.json")
    exports = json.load(open(exports_path)) if os.path.exists(exports_path) else []
    out["nearline_exports"] = [{k: e[k] for k in ("version", "events", "step", "exported_at")} for e in exports]
    nearline_versions = {e["version"] for e in exports}
    out["nearline_versions_served"] = sorted(nearline_versions & set(loop.versions_seen))
    out["encoder_service_stats"] = loop.services[0].stdout_json()
    out["nearline_stats"] = loop.services[1].stdout_json()
    return out


# -- printing ------------------------------------------------------------------------------------------------
def _ms(v):
    return "n/a" if v is None else f"{1000 * v:.0f} ms"


def print_summary(summary, out=sys.stdout):
    p = lambda *a: print(*a, file=out)  # noqa: E731
    prep = summary["prepare"]
    p(f"\nOnline demo: world {prep['data_dir']}, encoder {prep['encoder_version']} (dim {prep['dim']}), "
      f"initial model {prep['ctr_export']}; preparation {prep['seconds']} s, total {summary['seconds']} s")
    if summary.get("ports"):
        p(f"server: gRPC 127.0.0.1:{summary['ports']['grpc_port']}, REST 127.0.0.1:{summary['ports']['rest_port']}")
    if summary.get("freshness"):
        p("\nfreshness: new-item event → first ranking response that found its vector (poll every "
          f"{summary['config']['poll_interval_ms']:g} ms)")
        p("| rate | items | found | p50 | p99 | max | lower bound p50 / p99 | encoder p50 | poll wait p50 | "
          "visibility p50 | response p50 |")
        p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in summary["freshness"]:
            f, lb = r["freshness_s"], r["freshness_lower_bound_s"]
            p(f"| {r['rate']:g}/s | {r['items']} | {r['found']} | {_ms(f['p50'])} | {_ms(f['p99'])} | "
              f"{_ms(f['max'])} | {_ms(lb['p50'])} / {_ms(lb['p99'])} | {_ms(r['encoder_s']['p50'])} | "
              f"{_ms(r['poll_wait_s']['p50'])} | {_ms(r['visibility_s']['p50'])} | {_ms(r['response_s']['p50'])} |")
    enc = summary.get("encoder_service_stats")
    if enc:
        p(f"\nencoder service: {enc['written']} vectors written in {enc['batches']} batches, lag p50 "
          f"{_ms(enc['lag_p50_s'])} p99 {_ms(enc['lag_p99_s'])}, {enc['skipped']} skipped, {enc['errors']} errors")
    near = summary.get("nearline_stats")
    exports = summary.get("nearline_exports", [])
    p(f"near-line trainer: {near['events'] if near else '?'} impressions trained (of "
      f"{summary.get('impressions_replayed', 0)} replayed), exported versions "
      f"{[e['version'] for e in exports]}")
    p(f"server answered {summary.get('rank_calls', 0)} rank calls with versions {summary.get('versions_seen', [])}; "
      f"near-line versions served (hot swaps): {summary.get('nearline_versions_served', [])}")
    for ex in summary.get("ranked_examples", []):
        order = ex["ranking"]
        score = dict(zip(ex["candidates"], ex["scores"]))
        found = dict(zip(ex["candidates"], ex["found"]))
        ranked = ", ".join(f"{i}{'*' if i >= NEW_ITEM_ID_BASE else ''}:{score[i]:.4f}{'' if found[i] else '(no vec)'}"
                           for i in order)
        p(f"  user {ex['user_id']} (history {ex['history_length']}), version {ex['model_version']}: {ranked}")
    if summary.get("ranked_examples"):
        p("  (* = a brand-new item; id:score in ranked order; the last call repeated through gRPC with TF "
          f"Serving's client: max |score difference| {summary['ranked_examples'][-1]['grpc_max_abs_diff']:.2g})")
    for name, s in summary.get("services", {}).items():
        p(f"{name}: pid {s['pid']}, exit code {s['returncode']}" + (f" — FAILED: {s['failure']}" if s["failure"]
                                                                      else ""))
    p("OK" if summary["ok"] else "FAILED: " + "; ".join(summary["errors"]))


# -- command line --------------------------------------------------------------------------------------------
def define_flags():
    d = DemoConfig()
    flags.DEFINE_string("work_dir", d.work_dir, "Where the prepared artifacts and the run (online/) go.")
    flags.DEFINE_string("data_dir", d.data_dir, "An existing dataset to use (default: generate <work_dir>/data).")
    flags.DEFINE_string("world_flagfile", d.world_flagfile, "The synthetic world profile when generating one.")
    flags.DEFINE_string("encoder_export", d.encoder_export, "An encoder SavedModel (or its base path) to use "
                                                            "instead of training one.")
    flags.DEFINE_string("scl_flagfile", d.scl_flagfile, "SCL text encoder flagfile of the short training run.")
    flags.DEFINE_integer("scl_steps", d.scl_steps, "Steps of the SCL run.")
    flags.DEFINE_string("ctr_flagfile", d.ctr_flagfile, "CTR flagfile of the initial model (a multimodal variant; "
                                                        "the near-line trainer continues the same model).")
    flags.DEFINE_integer("ctr_steps", d.ctr_steps, "Max steps of the initial CTR run (0 = its epochs).")
    flags.DEFINE_float("duration_s", d.duration_s, "Seconds of new-item events per rate.")
    flags.DEFINE_list("new_item_rates", [f"{r:g}" for r in d.new_item_rates], "New-item events per second; one "
                                                                              "phase of --duration_s per rate.")
    flags.DEFINE_float("settle_s", d.settle_s, "After a phase, wait up to this long for its items to be found.")
    flags.DEFINE_float("hot_swap_timeout_s", d.hot_swap_timeout_s, "After the phases, wait up to this long for "
                       "the server to answer with a version the near-line trainer exported.")
    flags.DEFINE_float("impression_rate", d.impression_rate, "Impression events per second (0 = none).")
    flags.DEFINE_string("impression_split", d.impression_split, "The ctr split replayed (over and over).")
    flags.DEFINE_float("poll_interval_ms", d.poll_interval_ms, "Period of the measuring client's rank calls.")
    flags.DEFINE_integer("poll_clients", d.poll_clients, "Measuring client threads (connections), calling in turn.")
    flags.DEFINE_integer("nearline_batch_size", d.nearline_batch_size, "Near-line trainer batch size.")
    flags.DEFINE_float("nearline_export_every_s", d.nearline_export_every_s, "Near-line export period (s).")
    flags.DEFINE_float("server_poll_interval_s", d.server_poll_interval_s, "How often the server looks for new "
                                                                           "versions.")
    flags.DEFINE_integer("encoder_max_wait_ms", d.encoder_max_wait_ms, "The encoder service's micro-batch window "
                         "(-1: its flagfile's).")
    flags.DEFINE_integer("grpc_port", d.grpc_port, "Server gRPC port on 127.0.0.1 (0 = a free port).")
    flags.DEFINE_integer("rest_port", d.rest_port, "Server REST port on 127.0.0.1 (0 = a free port).")
    flags.DEFINE_float("startup_timeout_s", d.startup_timeout_s, "Max seconds for the services to start.")
    flags.DEFINE_float("stop_timeout_s", d.stop_timeout_s, "Max seconds for a service to stop after SIGTERM.")
    flags.DEFINE_integer("num_ranked_examples", d.num_ranked_examples, "Ranked responses printed at the end.")
    flags.DEFINE_integer("seed", d.seed, "Seed of the training runs and of the new items.")


def config_from_flags():
    f = flags.FLAGS
    values = {}
    for field in dataclasses.fields(DemoConfig):
        v = f[field.name].value
        values[field.name] = tuple(float(x) for x in v) if field.name == "new_item_rates" else v
    return DemoConfig(**values).validate()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        cfg = config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    summary = run(cfg)
    print_summary(summary)
    print(f"summary: {os.path.join(os.path.abspath(cfg.work_dir), 'online', 'summary.json')}")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
