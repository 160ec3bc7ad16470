"""Symbolic answer comparisons in worker processes with a hard time limit.

Why a process, and why not ``multiprocessing`` / ``pebble``: a SymPy comparison cannot be
interrupted from inside its own process (Math-Verify's limits use ``signal.alarm``, which
works only in a main thread, and a long C-level big-integer operation ignores signals
anyway), so the only limit that holds everywhere is to run it in another process and kill
that process when the deadline passes. The checker runs in TRL's reward call, in evaluation,
in thread pools and possibly in DataLoader workers; DataLoader workers are daemonic, and
daemonic processes may not start ``multiprocessing`` children (``pebble.ProcessPool`` fails
there with "daemonic processes are not allowed to have children"). So each worker is a plain
``subprocess`` (``python .../sedsft/metrics/sandbox.py``) speaking one JSON line per request on
its stdin / stdout: that works in any thread of any process.

The pool keeps up to ``size`` workers alive between checks, so the common case costs one
pipe round trip; a worker that misses its deadline is killed and a fresh one is started at
once (its start-up, about a second of imports, overlaps with the caller's next work and is
not charged to the next check's limit). Workers are restarted after ``max_checks`` checks
(SymPy's caches grow) and exit on their own when the parent's end of the pipe closes. After
``os.fork`` the child builds its own pool: pipes inherited from the parent are not shared.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0  # imports of SymPy and Math-Verify on a loaded machine
READY = "ready"


class CheckTimeout(Exception):
    """A symbolic comparison ran past its time limit (its worker was killed)."""


class WorkerError(Exception):
    """The worker died, failed to start or answered something unreadable."""


@dataclass
class _Worker:
    process: subprocess.Popen
    started: float
    checks: int = 0
    ready: bool = False
    buffer: bytes = b""

    @classmethod
    def start(cls) -> _Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        # Run as a script, not ``-m sedsft.metrics.sandbox``: the package's __init__ imports
        # torch, which would triple the worker's start-up (SymPy and Math-Verify alone: ~1 s).
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the caller's: an import error of the worker is seen, not swallowed
            env=env,
            bufsize=0,
        )
        return cls(process, time.monotonic())

    def _line(self, deadline: float) -> str:
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise CheckTimeout
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WorkerError(f"grading worker exited (code {self.process.poll()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def wait_ready(self) -> None:
        if not self.ready:
            try:
                line = self._line(self.started + STARTUP_TIMEOUT_S)
            except CheckTimeout:
                raise WorkerError(
                    f"grading worker not ready after {STARTUP_TIMEOUT_S:.0f} s"
                ) from None
            if line != READY:
                raise WorkerError(f"grading worker said {line[:200]!r} instead of {READY!r}")
            self.ready = True

    def ask(self, request: dict, timeout_s: float) -> dict:
        self.wait_ready()  # start-up is not part of the check's time limit
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
        except (BrokenPipeError, OSError) as err:
            raise WorkerError(f"grading worker gone ({err})") from err
        self.checks += 1
        reply = json.loads(self._line(time.monotonic() + timeout_s))
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()


class WorkerPool:
    """Up to ``size`` grading workers shared by the threads of one process."""

    def __init__(self, size: int = 2, max_checks: int = 5000):
        if size < 1:
            raise ValueError(f"grading pool size must be >= 1, got {size}")
        self.size, self.max_checks = size, max_checks
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._count = 0
        self._all: list[_Worker] = []

    def _take(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._count < self.size:
                self._count += 1
                worker = _Worker.start()
                self._all.append(worker)
                return worker
        return self._idle.get()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
            fresh = _Worker.start()  # starts now, in the background of the caller's work
            self._all.append(fresh)
        self._idle.put(fresh)

    def compare(self, gold: str, pred: str, unordered: bool, timeout_s: float) -> bool:
        """``symbolic.answers_equal(gold, pred, unordered)`` in a worker, within
        ``timeout_s`` seconds; raises ``CheckTimeout`` or ``WorkerError``."""
        worker = self._take()
        try:
            reply = worker.ask({"gold": gold, "pred": pred, "unordered": unordered}, timeout_s)
        except BaseException:
            self._replace(worker)
            raise
        if worker.checks >= self.max_checks:
            self._replace(worker)
        else:
            self._idle.put(worker)
        return bool(reply["equal"])

    def close(self) -> None:
        with self._lock:
            workers, self._all = self._all, []
            self._count = 0
        for worker in workers:
            worker.kill()
        self._idle = queue.LifoQueue()


_pool: WorkerPool | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def pool() -> WorkerPool:
    """This process's pool (a forked child gets its own; the parent's pipes are not used)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = WorkerPool(), os.getpid()
        return _pool


@atexit.register
def _close_pool() -> None:
    if _pool is not None and _pool_pid == os.getpid():
        _pool.close()


def _serve() -> None:
    """The worker's loop: one JSON request per stdin line, one JSON reply per stdout line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_sedsft_symbolic", Path(__file__).with_name("symbolic.py")
    )
    symbolic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(symbolic)  # only SymPy and Math-Verify, no torch (see _Worker.start)
    answers_equal = symbolic.answers_equal

    out = sys.stdout.buffer
    out.write((READY + "\n").encode())
    out.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            try:
                equal = answers_equal(request["gold"], request["pred"], request["unordered"])
            except Exception:  # SymPy failing on an odd answer: not equal, as at the caller
                equal = False
            reply = {"equal": bool(equal)}
        except Exception as err:  # an unreadable request: the caller's bug, say so
            reply = {"error": f"{type(err).__name__}: {err}"}
        out.write((json.dumps(reply) + "\n").encode())
        out.flush()


if __name__ == "__main__":
    _serve()
