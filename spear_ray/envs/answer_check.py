"""Answer checks that always finish: the symbolic comparison runs in a child process that has a
time and a memory budget.

A policy can write answers whose symbolic check never ends or fills the machine's memory:
`2^{1000000000}`, `1000000000!`, towers of exponents. One such answer would block a reward
call, and a policy that finds them would slow every step. So `bounded_answers_match` does the
cheap, bounded checks here (math_verifier.quick_match on an answer of at most MAX_ANSWER_CHARS
characters once redundant outer braces are dropped) and sends only what is left to a checker
process: a Python child that has imported the symbolic backends once, runs one check at a time
under an address-space limit, and is killed when a check runs past its time budget. Past its
budget, or out of memory, an answer is wrong: never an error and never a hang. A fresh child is
started right after a kill, so the next check finds one ready.

Each process keeps at most MAX_CHECKERS children per memory budget (env threads of a rollout
worker check answers concurrently); a child exits when its parent does.
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

from spear_ray.envs.math_verifier import (
    VerifierName,
    quick_match,
    strip_outer_braces,
    symbolic_match,
)

# Gold answers of math datasets are a few dozen characters; a longer answer is wrong unless the
# gold answer itself is long (then up to twice its length).
MAX_ANSWER_CHARS = 1000
MAX_RAW_ANSWER_CHARS = 100_000  # before redundant outer braces are dropped
MAX_CHECKERS = 2
STARTUP_TIMEOUT_S = 120.0  # a cold Python + sympy import on a busy 2-core machine


def bounded_answers_match(
    pred: str | None,
    gold: str,
    verifier: VerifierName = "auto",
    *,
    timeout_s: float = 0.5,
    memory_mb: int = 512,
) -> bool:
    """answers_match (math_verifier) within `timeout_s` seconds and `memory_mb` MB of address
    space for the symbolic part; an answer past either budget is wrong."""
    if pred is None or len(pred) > MAX_RAW_ANSWER_CHARS:
        return False
    pred = strip_outer_braces(pred.strip())  # `{{{1}}}` is 1, however deep
    if not pred or len(pred) > max(MAX_ANSWER_CHARS, 2 * len(gold)):
        return False
    quick = quick_match(pred, gold)
    if quick is not None:
        return quick
    checker = _acquire(memory_mb)
    try:
        return checker.check(pred, gold, verifier, timeout_s)
    finally:
        _release(checker)


class CheckerProcess:
    """One child process running `symbolic_match`, one check at a time."""

    def __init__(self, memory_mb: int):
        self.memory_mb = memory_mb
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spear_ray.envs.answer_check", str(memory_mb), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self, pred: str, gold: str, verifier: VerifierName, timeout_s: float) -> bool:
        if not self.ready:
            line = self._read_line(STARTUP_TIMEOUT_S)
            if line != b"ready\n":
                self.kill()
                raise RuntimeError(
                    "answer checker process did not start (a Python child importing sympy); "
                    "check the environment, or raise env.options.verifier_memory_mb"
                )
            self.ready = True
        request = json.dumps({"pred": pred, "gold": gold, "verifier": verifier}) + "\n"
        try:
            self.proc.stdin.write(request.encode())
            self.proc.stdin.flush()
        except OSError:  # the child died (e.g. out of memory on the last check)
            self.kill()
            return False
        line = self._read_line(timeout_s)
        if line is None or not line.startswith(b"{"):
            self.kill()  # past its budget, or killed by the memory limit: wrong
            return False
        return bool(json.loads(line)["match"])

    def _read_line(self, timeout_s: float) -> bytes | None:
        """One line from the child within timeout_s, else None (the child writes whole lines
        of a few bytes, so a readable pipe holds the whole line)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([self.proc.stdout], [], [], left)
            if readable:
                line = self.proc.stdout.readline()
                return line or None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


class _Pool:
    def __init__(self, memory_mb: int):
        self.memory_mb = memory_mb
        self.idle: queue.SimpleQueue[CheckerProcess] = queue.SimpleQueue()
        self.slots = threading.BoundedSemaphore(MAX_CHECKERS)
        self.all: list[CheckerProcess] = []


_pools: dict[int, _Pool] = {}
_pools_lock = threading.Lock()


def _pool(memory_mb: int) -> _Pool:
    with _pools_lock:
        if memory_mb not in _pools:
            _pools[memory_mb] = _Pool(memory_mb)
        return _pools[memory_mb]


def _acquire(memory_mb: int) -> CheckerProcess:
    pool = _pool(memory_mb)
    pool.slots.acquire()
    try:
        while True:
            checker = pool.idle.get_nowait()
            if checker.alive():
                return checker
            checker.kill()  # died while idle: reap it and forget it
            with _pools_lock:
                pool.all.remove(checker)
    except queue.Empty:
        pass
    checker = CheckerProcess(memory_mb)
    with _pools_lock:
        pool.all.append(checker)
    return checker


def _release(checker: CheckerProcess) -> None:
    pool = _pool(checker.memory_mb)
    with _pools_lock:
        if not checker.alive():  # killed past its budget: start the next one now
            pool.all.remove(checker)
            checker = CheckerProcess(checker.memory_mb)
            pool.all.append(checker)
    pool.idle.put(checker)
    pool.slots.release()


@atexit.register
def _stop_all() -> None:
    with _pools_lock:
        for pool in _pools.values():
            for checker in pool.all:
                checker.kill()


# ----------------------------------------------------------------------------- the child


def _child(memory_mb: int, parent_pid: int) -> None:
    import resource

    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def exit_with_parent() -> None:  # a check may run for ever: do not outlive the parent
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    symbolic_match("1", "2", "auto")  # import the backends before saying ready
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            match = symbolic_match(request["pred"], request["gold"], request["verifier"])
        except (Exception, MemoryError, RecursionError):
            match = False
        out.write(json.dumps({"match": bool(match)}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]))
