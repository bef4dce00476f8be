r"""A local tf.distribute cluster for development: N workers (+ M parameter servers, + a chief) on 127.0.0.1.

Every process runs the same command with its own `TF_CONFIG` (free 127.0.0.1 ports, one per task), exactly
as on a real cluster where each host runs the command with its host's `TF_CONFIG` (see BUILD.md):

```
# data-parallel (MultiWorkerMirroredStrategy): 2 workers, worker 0 is the chief
python -m tools.cluster --workers=2 -- python -m mm_ads.train --flagfile=configs/ctr/smoke.flags \
    --data_dir=DIR --model_dir=runs/mw --strategy=multi_worker
# parameter servers (ParameterServerStrategy): a chief (the coordinator) + 2 workers + 2 ps
python -m tools.cluster --workers=2 --ps=2 --chief -- python -m mm_ads.train --flagfile=configs/ctr/smoke.flags \
    --data_dir=DIR --model_dir=runs/ps --strategy=parameter_server --embedding_shards=2
```

* Output: every line of every process is streamed to stdout prefixed with its task (`[worker:1] ...`), and
  with `--log_dir` also written to `<log_dir>/<type>-<index>.log`.
* Completion: the cluster is done when its *primary* tasks have exited: the chief if there is one (the
  ParameterServerStrategy coordinator; ps and worker tasks then only serve and never exit by themselves),
  else every worker. The remaining tasks are then stopped.
* Failure: the first task that exits with a non-zero status (or a server task that exits at all while the
  primaries still run) stops the whole cluster, and the launcher exits with that status. A task killed by a
  signal counts as failed (status 128 + signal).
* Ctrl-C / SIGTERM / `--timeout`: every task is stopped (SIGTERM to its process group, SIGKILL after
  `--grace_s`), all are reaped, exit status 130 / 143 / 124.

The same class, `LocalCluster`, runs the multi-process tests (`tests/distributed/`).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

TASK_TYPES = ("chief", "worker", "ps")


def free_ports(n, host="127.0.0.1"):
    """`n` distinct TCP ports free on `host` right now (bound to port 0, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_spec(num_workers, num_ps=0, chief=False, host="127.0.0.1"):
    """`{"chief": [...], "worker": [...], "ps": [...]}` on free ports of `host` (empty jobs left out)."""
    if num_workers < 1 and not chief:
        raise ValueError("a cluster needs at least one worker or a chief")
    if num_ps < 0:
        raise ValueError(f"num_ps must be >= 0, got {num_ps}")
    ports = iter(free_ports(int(chief) + num_workers + num_ps, host))
    spec = {}
    for job, n in (("chief", int(chief)), ("worker", num_workers), ("ps", num_ps)):
        if n:
            spec[job] = [f"{host}:{next(ports)}" for _ in range(n)]
    return spec


def tf_config(spec, task_type, index):
    """The `TF_CONFIG` JSON of one task of `spec`."""
    if task_type not in spec or not 0 <= index < len(spec[task_type]):
        raise ValueError(f"task {task_type}:{index} is not in the cluster {spec}")
    return json.dumps({"cluster": spec, "task": {"type": task_type, "index": index}})


class Task:
    """One process of the cluster: its name, `Popen`, and the lines it printed (also streamed)."""

    def __init__(self, task_type, index, popen, log_file):
        self.type, self.index, self.popen, self.log_file = task_type, index, popen, log_file
        self.lines = []
        self.reader = None

    @property
    def name(self):
        return f"{self.type}:{self.index}"

    @property
    def output(self):
        return "".join(self.lines)

    def returncode(self):
        code = self.popen.poll()
        return None if code is None else (128 - code if code < 0 else code)  # killed by signal s → 128 + s


class LocalCluster:
    """Starts, watches and reaps a local cluster running `command` in every task.

    Args:
        command: argv list run by every task (each gets its own `TF_CONFIG`).
        num_workers: worker tasks.
        num_ps: parameter-server tasks.
        chief: add a chief task (the ParameterServerStrategy coordinator, or an extra MWMS chief).
        env: environment of the tasks (default: this process's), `TF_CONFIG` added per task.
        cwd: working directory of the tasks.
        log_dir: also write each task's output to `<log_dir>/<type>-<index>.log`.
        stream: where prefixed lines go: "stdout" (the current `sys.stdout`, the default), a file object, or
            None (kept in `Task.lines` only).
        grace_s: between SIGTERM and SIGKILL when stopping tasks.
        env_per_task: optional `{"worker:1": {VAR: value}}` extra environment of single tasks.

    Use as a context manager (every task is stopped and reaped on exit, whatever happened):

    ```python
    with LocalCluster(cmd, num_workers=2) as cluster:
        code = cluster.wait(timeout=300)
    ```
    """

    def __init__(self, command, num_workers, num_ps=0, chief=False, env=None, cwd=None, log_dir=None,
                 stream="stdout", grace_s=5.0, env_per_task=None, host="127.0.0.1"):
        self.command = list(command)
        self.spec = cluster_spec(num_workers, num_ps, chief, host)
        self.env = dict(os.environ if env is None else env)
        self.cwd, self.log_dir, self.stream = cwd, log_dir, stream
        self.grace_s = grace_s
        self.env_per_task = env_per_task or {}
        self.tasks = []
        self._lock = threading.Lock()
        self.failed = None  # the first failed Task

    # -- start ------------------------------------------------------------------------------
    def start(self):
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
        # ps first, then workers, then the chief: servers are up when the coordinator connects
        for task_type in ("ps", "worker", "chief"):
            for index in range(len(self.spec.get(task_type, []))):
                self._start_task(task_type, index)
        return self

    def _start_task(self, task_type, index):
        env = dict(self.env, TF_CONFIG=tf_config(self.spec, task_type, index), PYTHONUNBUFFERED="1")
        env.update(self.env_per_task.get(f"{task_type}:{index}", {}))
        log_file = open(os.path.join(self.log_dir, f"{task_type}-{index}.log"), "w") if self.log_dir else None
        popen = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace",
                                 start_new_session=True)  # own process group: stopped with all its children
        task = Task(task_type, index, popen, log_file)
        task.reader = threading.Thread(target=self._pump, args=(task,), daemon=True)
        task.reader.start()
        self.tasks.append(task)
        return task

    def _pump(self, task):
        prefix = f"[{task.name}] "
        for line in task.popen.stdout:
            task.lines.append(line)
            if task.log_file:
                task.log_file.write(line)
                task.log_file.flush()
            if self.stream is not None:
                stream = sys.stdout if self.stream == "stdout" else self.stream
                with self._lock:
                    stream.write(prefix + line)
                    stream.flush()

    # -- watch ------------------------------------------------------------------------------
    def task(self, task_type, index=0):
        for t in self.tasks:
            if (t.type, t.index) == (task_type, index):
                return t
        raise KeyError(f"no task {task_type}:{index}")

    @property
    def primaries(self):
        """The tasks whose exit ends the job: the chief if any, else the workers."""
        chief = [t for t in self.tasks if t.type == "chief"]
        return chief or [t for t in self.tasks if t.type == "worker"]

    def poll(self):
        """None while running; else the cluster's exit status (0 when every primary succeeded)."""
        primaries = self.primaries
        for t in self.tasks:
            code = t.returncode()
            if code is None:
                continue
            if code != 0 or t not in primaries:  # a server task never ends on its own while the job runs
                if self.failed is None:
                    self.failed = t
                return code if code != 0 else 1
        if all(t.returncode() == 0 for t in primaries):
            return 0
        return None

    def wait(self, timeout=None, interrupted=None):
        """Waits for the cluster to finish (see `poll`), stops every remaining task, returns the status.

        On timeout every task is stopped and `TimeoutError` is raised. `interrupted` (a `threading.Event`,
        set e.g. by a signal handler) stops every task and raises `KeyboardInterrupt` here, at a safe point
        (an interrupt raised inside `subprocess` calls can leave a `Popen` unwaitable).
        """
        deadline = None if timeout is None else time.time() + timeout
        while True:
            if interrupted is not None and interrupted.is_set():
                self.stop()
                raise KeyboardInterrupt
            code = self.poll()
            if code is not None:
                self.stop()
                return code
            if deadline is not None and time.time() > deadline:
                self.stop()
                raise TimeoutError(f"the cluster did not finish within {timeout} s")
            time.sleep(0.05)

    def kill_task(self, task_type, index=0, sig=signal.SIGKILL):
        """Sends `sig` to one task's process group (e.g. to test recovery from a lost worker)."""
        t = self.task(task_type, index)
        if t.popen.poll() is None:
            os.killpg(t.popen.pid, sig)

    # -- stop -------------------------------------------------------------------------------
    def stop(self):
        """SIGTERM to every live task's process group, SIGKILL after the grace period; reaps all of them."""
        live = [t for t in self.tasks if t.popen.poll() is None]
        for t in live:
            _signal_group(t.popen.pid, signal.SIGTERM)
        deadline = time.time() + self.grace_s
        for t in live:
            try:
                t.popen.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for t in self.tasks:
            if t.popen.poll() is None:
                _signal_group(t.popen.pid, signal.SIGKILL)
            t.popen.wait()
            _signal_group(t.popen.pid, signal.SIGKILL)  # stray children left in the group
            if t.reader is not None:
                t.reader.join(timeout=5)
            if t.log_file and not t.log_file.closed:
                t.log_file.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def _signal_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Run a command as a local tf.distribute cluster (per-task TF_CONFIG on 127.0.0.1).",
        usage="python -m tools.cluster [--workers=N] [--ps=M] [--chief] [--log_dir=DIR] -- COMMAND ...")
    parser.add_argument("--workers", type=int, default=2, help="worker tasks")
    parser.add_argument("--ps", type=int, default=0, help="parameter-server tasks")
    parser.add_argument("--chief", action="store_true", help="add a chief task (the PS coordinator)")
    parser.add_argument("--log_dir", default="", help="also write <log_dir>/<type>-<index>.log")
    parser.add_argument("--timeout", type=float, default=0, help="stop everything after this many seconds (0 = none)")
    parser.add_argument("--grace_s", type=float, default=5.0, help="SIGTERM → SIGKILL delay when stopping")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command every task runs (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.ps and not args.chief:
        parser.error("--ps needs --chief: the ParameterServerStrategy coordinator runs in the chief task")
    cluster = LocalCluster(command, args.workers, args.ps, args.chief, log_dir=args.log_dir or None,
                           grace_s=args.grace_s)
    print(f"cluster: {json.dumps(cluster.spec)}", flush=True)

    interrupted, received = threading.Event(), []

    def on_signal(signum, frame):  # only flags it: the wait loop stops the tasks at a safe point
        received.append(signum)
        interrupted.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.start()
        code = cluster.wait(timeout=args.timeout or None, interrupted=interrupted)
    except TimeoutError as e:
        print(f"cluster: {e}; stopped", file=sys.stderr, flush=True)
        return 124
    except KeyboardInterrupt:
        cluster.stop()
        print("cluster: interrupted; every task stopped", file=sys.stderr, flush=True)
        return 128 + int(received[0] if received else signal.SIGINT)
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code:
        who = cluster.failed.name if cluster.failed else "?"
        print(f"cluster: task {who} failed with status {code}; every task stopped", file=sys.stderr, flush=True)
    else:
        print("cluster: done", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
