"""Client of the per-node sandbox fork-server (server.py): start, call, restart, close.

One `SandboxClient` is shared by every environment of a process; `run_python` may be called from
many threads at once and `arun_python` from coroutines. Requests are multiplexed over one pipe
pair and run in parallel on the server, each in its own forked, uid-dropped, seccomp-filtered
child. If the server dies, every call in flight returns an `ExecResult` with `infra_error` set
and the next call starts a new server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from spear_ray.sandbox.config import SandboxConfig
from spear_ray.sandbox.result import ExecResult

logger = logging.getLogger(__name__)

_HDR = struct.Struct(">I")
_SERVER_SOURCE = Path(__file__).resolve().with_name("server.py")
_SERVER_INSIDE = "/tmp/.spear-sandbox/server.py"
# What the server keeps of root's powers inside bwrap: make and chown scratch dirs, drop to the
# per-slot uid, kill a call's processes, and delete its files. The child drops all of them.
_SERVER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL", "CAP_DAC_OVERRIDE")
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_INSTALL_BWRAP = (
    "install it with `apt-get install -y bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`, "
    "or set sandbox.bwrap_path; sandbox.isolation=none is for trusted debugging only"
)


class SandboxUnavailableError(RuntimeError):
    """The sandbox cannot start here (bubblewrap or seccomp missing, namespaces forbidden)."""


def _infra(message: str, t0: float) -> ExecResult:
    return ExecResult(
        stdout="",
        stderr="",
        exit_code=None,
        timed_out=False,
        wall_s=time.monotonic() - t0,
        infra_error=message,
    )


def _resolve(fut: concurrent.futures.Future, result: ExecResult) -> None:
    """Set a call's result unless its caller gave up on it (a cancelled arun_python)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        fut.set_result(result)


def _to_result(msg: dict) -> ExecResult:
    return ExecResult(
        stdout=msg["stdout"],
        stderr=msg["stderr"],
        exit_code=msg["exit_code"],
        timed_out=msg["timed_out"],
        wall_s=msg["wall_s"],
        stdout_truncated=msg["stdout_truncated"],
        stderr_truncated=msg["stderr_truncated"],
        infra_error=msg["infra_error"],
    )


@functools.lru_cache(maxsize=8)
def _interpreter_paths(python: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the sandboxed interpreter needs: (its prefixes, the dirs on its sys.path)."""
    probe = "import json, sys; print(json.dumps([[sys.prefix, sys.base_prefix, sys.exec_prefix, " \
        "sys.base_exec_prefix], sys.path]))"  # fmt: skip
    out = subprocess.run(
        [python, "-E", "-s", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PATH": _SYSTEM_PATH, "LANG": "C.UTF-8"},
    ).stdout
    prefixes, path = json.loads(out)
    path = [os.path.dirname(python), os.path.dirname(os.path.realpath(python)), *path]

    def clean(paths: list[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(os.path.normpath(p) for p in paths if p and os.path.exists(p)))

    return clean(prefixes), clean(path)


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _project_root() -> str | None:
    """The source checkout this package runs from, if any (hidden from the sandbox)."""
    root = Path(__file__).resolve().parents[2]
    return str(root) if (root / "pyproject.toml").exists() else None


class _ServerProcess:
    """One running server: the process, a reader thread that pairs replies with calls, and a
    thread that keeps the tail of its stderr. The process is spawned from the reader thread,
    which lives as long as the server, because bwrap's --die-with-parent follows the thread."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self._argv = argv
        self._env = env
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[concurrent.futures.Future, float]] = {}
        self._death: str | None = None
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        self.info: dict = {}
        self.error: str | None = None
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self._thread = threading.Thread(target=self._main, name="sandbox-server", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.ready.is_set() and self.error is None and self._death is None

    # -------------------------------------------------------------------------- threads

    def _main(self) -> None:
        try:
            self.proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                start_new_session=True,  # a Ctrl-C in the terminal is not meant for the sandbox
                close_fds=True,
            )
        except OSError as e:
            self.error = f"sandbox: cannot start {self._argv[0]}: {e}"
            self.ready.set()
            return
        threading.Thread(target=self._drain_stderr, name="sandbox-stderr", daemon=True).start()
        reason = "sandbox server exited"
        try:
            hello = self._read_frame()
            if hello is None or "fatal" in hello:
                self.error = self._startup_error(hello)
                return
            self.info = hello
            self.ready.set()
            while (msg := self._read_frame()) is not None:
                with self._lock:
                    entry = self._pending.pop(msg["id"], None)
                if entry is not None:
                    _resolve(entry[0], _to_result(msg))
        except Exception as e:  # a broken frame is as fatal as a dead server
            reason = f"sandbox protocol error: {type(e).__name__}: {e}"
        finally:
            self._on_exit(reason)

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                logger.debug("sandbox server: %s", line)

    def _read_frame(self) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        head = self.proc.stdout.read(_HDR.size)
        if len(head) < _HDR.size:
            return None
        (n,) = _HDR.unpack(head)
        body = self.proc.stdout.read(n)
        if len(body) < n:
            return None
        return json.loads(body)

    def _startup_error(self, hello: dict | None) -> str:
        if hello is not None:
            return hello["fatal"]
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        time.sleep(0.05)  # let the stderr thread catch the last line
        last = self.stderr_tail[-1] if self.stderr_tail else "no output"
        return (
            f"sandbox: server failed to start (exit {self.proc.returncode}): {last}; "
            "bubblewrap needs permission to create namespaces (run as root or with "
            "unprivileged user namespaces enabled)"
        )

    def _on_exit(self, reason: str) -> None:
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        detail = (
            f" (exit status {self.proc.returncode})" if self.proc.returncode is not None else ""
        )
        tail = f": {self.stderr_tail[-1]}" if self.stderr_tail else ""
        with self._lock:
            self._death = self._death or f"{reason}{detail}{tail}"
            pending, self._pending = self._pending, {}
        for fut, t0 in pending.values():
            _resolve(fut, _infra(self._death, t0))
        self.ready.set()

    # -------------------------------------------------------------------------- calls

    def submit(
        self, call_id: int, code: str, timeout_s: float
    ) -> tuple[concurrent.futures.Future, int]:
        """Send one request; returns its future and how many calls were ahead of it."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        t0 = time.monotonic()
        body = json.dumps({"id": call_id, "code": code, "timeout_s": timeout_s}).encode()
        with self._lock:
            if self._death is not None:
                fut.set_result(_infra(self._death, t0))
                return fut, 0
            ahead = len(self._pending)
            self._pending[call_id] = (fut, t0)
            try:
                assert self.proc is not None and self.proc.stdin is not None
                self.proc.stdin.write(_HDR.pack(len(body)) + body)
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:
                self._pending.pop(call_id, None)
                fut.set_result(_infra(f"sandbox server unreachable: {e}", t0))
        return fut, ahead

    def forget(self, call_id: int) -> None:
        with self._lock:
            self._pending.pop(call_id, None)

    def kill(self, reason: str) -> None:
        with self._lock:
            self._death = self._death or reason
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def close(self, wait_s: float = 5.0) -> None:
        if self.proc is None:
            return
        with self._lock:
            self._death = self._death or "sandbox client closed"
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: the server kills what is running and exits
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=wait_s)


class SandboxClient:
    """Runs Python snippets in the node's sandbox server; thread-safe and asyncio-friendly.

    >>> with SandboxClient(SandboxConfig()) as sandbox:
    ...     sandbox.run_python("print(6 * 7)").stdout
    '42\\n'
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.restarts = 0  # servers started after the first one
        self._lock = threading.Lock()
        self._server: _ServerProcess | None = None
        self._ids = itertools.count(1)
        self._closed = False
        self._ever_started = False
        self._scratch_tmp: str | None = None  # host scratch root for isolation 'none'

    # -------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the server now (otherwise the first call does); raises SandboxUnavailableError
        with a one-line reason and fix if the sandbox cannot run on this machine."""
        self._ensure_server()

    @property
    def server_pid(self) -> int | None:
        """Host pid of the server's outermost process (bwrap, or python with isolation 'none')."""
        srv = self._server
        return srv.proc.pid if srv is not None and srv.proc is not None else None

    @property
    def server_info(self) -> dict:
        """The server's hello: pid inside the sandbox, uid_isolation, seccomp, preloaded."""
        srv = self._server
        return dict(srv.info) if srv is not None else {}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            srv, self._server = self._server, None
        if srv is not None:
            srv.close()
        if self._scratch_tmp is not None:
            shutil.rmtree(self._scratch_tmp, ignore_errors=True)
            self._scratch_tmp = None

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -------------------------------------------------------------------------- calls

    def run_python(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run `code` like `python -c code` in a fresh sandboxed process; blocks until done."""
        t0 = time.monotonic()
        submitted = self._submit(code, timeout_s, t0)
        if isinstance(submitted, ExecResult):
            return submitted
        srv, call_id, fut, wait_s = submitted
        try:
            return fut.result(timeout=wait_s)
        except concurrent.futures.TimeoutError:
            return self._hung(srv, call_id, wait_s, t0)

    async def arun_python(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """`run_python` for coroutines: waits on the reply without blocking the event loop."""
        t0 = time.monotonic()
        srv = self._server
        if srv is None or not srv.alive:  # starting takes seconds: do it off the loop
            submitted = await asyncio.to_thread(self._submit, code, timeout_s, t0)
        else:
            submitted = self._submit(code, timeout_s, t0)
        if isinstance(submitted, ExecResult):
            return submitted
        srv, call_id, fut, wait_s = submitted
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), wait_s)
        except asyncio.TimeoutError:
            return self._hung(srv, call_id, wait_s, t0)

    def _submit(self, code: str, timeout_s: float | None, t0: float):
        timeout = float(self.config.timeout_s if timeout_s is None else timeout_s)
        if timeout <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout}")
        try:
            srv = self._ensure_server()
        except SandboxUnavailableError as e:
            if not self._ever_started:
                raise
            return _infra(f"sandbox server could not be restarted: {e}", t0)
        call_id = next(self._ids)
        fut, ahead = srv.submit(call_id, code, timeout)
        # Calls beyond max_concurrent wait on the server; allow for the ones ahead of us.
        rounds = 1 + ahead // self.config.max_concurrent
        wait_s = rounds * (timeout + 1.0) + self.config.reply_grace_s
        return srv, call_id, fut, wait_s

    def _hung(self, srv: _ServerProcess, call_id: int, wait_s: float, t0: float) -> ExecResult:
        msg = f"sandbox server gave no reply within {wait_s:.1f}s; restarting it"
        logger.error(msg)
        srv.forget(call_id)
        srv.kill(msg)
        return _infra(msg, t0)

    def _ensure_server(self) -> _ServerProcess:
        srv = self._server
        if srv is not None and srv.alive:
            return srv
        with self._lock:
            if self._closed:
                raise RuntimeError("SandboxClient is closed")
            srv = self._server
            if srv is not None and srv.alive:
                return srv
            if srv is not None:
                self.restarts += 1
                logger.warning("sandbox server died (%s); starting a new one", srv._death)
            argv, env = self._command()
            srv = _ServerProcess(argv, env)
            if not srv.ready.wait(self.config.start_timeout_s):
                srv.kill("start timeout")
                raise SandboxUnavailableError(
                    f"sandbox: server did not start within {self.config.start_timeout_s:.0f}s"
                )
            if srv.error is not None or not srv.alive:
                srv.kill("failed to start")
                raise SandboxUnavailableError(srv.error or srv._death or "sandbox: server died")
            self._server = srv
            self._ever_started = True
            logger.info("sandbox server ready: %s", srv.info)
            return srv

    # -------------------------------------------------------------------------- command line

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cfg = self.config
        python = cfg.python or sys.executable
        if cfg.python and os.sep not in python:
            python = shutil.which(python) or python
        env = {"PATH": _SYSTEM_PATH, "LANG": "C.UTF-8"}
        bwrap = cfg.isolation == "bwrap"
        as_root = os.geteuid() == 0
        opts = {
            "uid_isolation": bwrap and as_root,
            "seccomp": bwrap,
            "uid_base": cfg.uid_base,
            "max_concurrent": cfg.max_concurrent,
            "warm_children": cfg.warm_children,
            "cpu_seconds": cfg.cpu_seconds,
            "memory_bytes": cfg.memory_mb * 2**20,
            "max_open_files": cfg.max_open_files,
            "max_file_bytes": cfg.max_file_size_mb * 2**20,
            "max_processes": cfg.max_processes,
            "max_output_bytes": cfg.max_output_bytes,
            "output_kill_bytes": cfg.output_kill_bytes,
            "preload": list(cfg.preload_modules),
            "hugepages": cfg.hugepages,
            "scratch_root": "/tmp/spear-scratch",
        }
        if not bwrap:
            logger.warning(
                "sandbox.isolation=none: model-written code runs WITHOUT bubblewrap, seccomp or "
                "a uid drop, as this user on this host; use it only for trusted debugging"
            )
            if self._scratch_tmp is None:
                self._scratch_tmp = tempfile.mkdtemp(prefix="spear-sandbox-")
            opts["scratch_root"] = os.path.join(self._scratch_tmp, f"run{self.restarts}")
        if not bwrap:
            return [python, "-E", "-s", "-B", str(_SERVER_SOURCE), json.dumps(opts)], env
        server_argv = [python, "-E", "-s", "-B", _SERVER_INSIDE, json.dumps(opts)]

        bwrap_exe = shutil.which(cfg.bwrap_path)
        if bwrap_exe is None:
            raise SandboxUnavailableError(
                f"sandbox: bubblewrap not found (sandbox.bwrap_path={cfg.bwrap_path!r}); "
                + _INSTALL_BWRAP
            )
        if not as_root:
            logger.warning(
                "sandbox: not running as root, so calls share this user's uid inside a user "
                "namespace (no per-call uid, no RLIMIT_NPROC); run as root to isolate calls"
            )
        hidden = [p for p in cfg.hide_paths if os.path.isdir(p)]
        project = _project_root()
        if project is not None and not any(_under(project, h) for h in hidden):
            hidden.append(project)
        masked = ["/tmp", "/dev/shm", *hidden]  # host dirs the sandbox replaces with a tmpfs
        try:
            prefixes, sys_path = _interpreter_paths(python)
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxUnavailableError(f"sandbox: cannot run python {python!r}: {e}") from e
        exposed: list[str] = []
        for p in sorted({*prefixes, *sys_path, *cfg.expose_paths}, key=len):
            if not os.path.exists(p) or not any(_under(p, h) for h in masked):
                continue  # visible anyway
            if any(_under(p, q) for q in exposed):
                continue  # already visible through a parent
            in_project = project is not None and _under(p, project)
            if in_project and not any(_under(p, q) for q in prefixes) and p not in cfg.expose_paths:
                continue  # never the project's own source tree (editable installs)
            exposed.append(p)
        tmp_bytes = str(cfg.tmp_size_mb * 2**20)
        argv = [bwrap_exe, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
        argv += ["--perms", "0755", "--size", tmp_bytes, "--tmpfs", "/tmp"]
        argv += ["--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/dev/shm"]
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
        argv += ["--unshare-cgroup-try", "--hostname", "sandbox"]
        argv += ["--die-with-parent", "--new-session", "--chdir", "/", "--clearenv"]
        argv += ["--setenv", "PATH", _SYSTEM_PATH, "--setenv", "LANG", "C.UTF-8"]
        for p in hidden:
            argv += ["--tmpfs", p]
        made: set[str] = set()
        for p in exposed:
            # bwrap would create the missing parents (e.g. /root/.pyenv) as 0700 root dirs
            top = next(h for h in masked if _under(p, h))
            for parent in reversed(Path(p).parents):
                d = str(parent)
                if _under(d, top) and d != top and d not in made:
                    argv += ["--perms", "0755", "--dir", d]
                    made.add(d)
            argv += ["--ro-bind", p, p]
        argv += ["--ro-bind", str(_SERVER_SOURCE), _SERVER_INSIDE]  # just this one file
        if as_root:
            argv += ["--cap-drop", "ALL"]
            for cap in _SERVER_CAPS:
                argv += ["--cap-add", cap]
        else:
            argv += ["--unshare-user", "--disable-userns"]
        return [*argv, "--", *server_argv], env
