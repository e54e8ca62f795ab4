"""Client of the per-node sandbox fork-server (server.py): start, call, restart, close.

One `SandboxClient` is shared by every environment of a process; `run_python` may be called from
many threads at once and `arun_python` from coroutines. Requests are multiplexed over one pipe
pair and run in parallel on the server, each in its own forked, uid-dropped, seccomp-filtered
child, the init of its own pid namespace. If the server dies, every call in flight returns an
`ExecResult` with `infra_error` set and the next call starts a new server.

The sandbox sees an allow list of host paths (the system dirs, a few files of /etc, the
interpreter's prefixes and sys.path, sandbox.expose_paths), read-only; nothing else of the host
exists in it. Paths given to `hide()` (an env's data files) are masked even inside those.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
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
# per-slot uid, kill a call's processes, delete its files, and give each call its own pid and
# mount namespace (CAP_SYS_ADMIN). The child drops all of them.
_SERVER_CAPS = (
    "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL", "CAP_DAC_OVERRIDE", "CAP_SYS_ADMIN"
)  # fmt: skip
# Without root (a user namespace): the calls' namespaces, and CAP_SETPCAP so that each call can
# empty its bounding set before its code runs.
_USERNS_CAPS = ("CAP_SYS_ADMIN", "CAP_SETPCAP")
# The sandbox sees nothing of the host but what the interpreter needs: datasets (with their gold
# answers) sit anywhere, /data, /opt, /srv, so a deny list always misses one. These system dirs,
# the interpreter's own paths and sandbox.expose_paths are bound read-only; the rest is absent.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
# Of /etc, what the dynamic linker and libc read (library cache, time zone, Debian's
# alternatives symlinks), and stubs for the user and host name lookups.
_ETC_PATHS = ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives")
_ETC_STUBS = (
    ("/etc/passwd", "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
    ("/etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("/etc/hostname", "sandbox\n"),
)  # fmt: skip
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


def _interpreter_binds(python: str, cfg: SandboxConfig, project: str | None) -> list[str]:
    """Host dirs the sandbox gets besides the system ones: the interpreter's prefixes and
    sys.path, and sandbox.expose_paths, each at its real path too when reached via a symlink.
    Never the project's own source tree, which an editable install puts on sys.path."""
    prefixes, sys_path = _interpreter_paths(python)
    binds: list[str] = []
    for p in (*prefixes, *sys_path, *cfg.expose_paths):
        in_project = project is not None and _under(p, project)
        if in_project and not any(_under(p, q) for q in prefixes) and p not in cfg.expose_paths:
            continue
        for q in (os.path.normpath(p), os.path.realpath(p)):
            if os.path.exists(q) and q not in binds:
                binds.append(q)
    return sorted(binds, key=len)


def _layer_of(path: str, layers: list[tuple[str, str]]) -> str | None:
    """'bind' or 'mask': the kind of the innermost layer over `path` (the later on a tie)."""
    kind, depth = None, -1
    for k, q in layers:
        if _under(path, q) and len(q) >= depth:
            kind, depth = k, len(q)
    return kind


def _mount_plan(
    system: list[str], binds: list[str], deny: list[str], data: list[str]
) -> list[tuple[str, str]]:
    """The ("bind" | "mask", path) layers of the sandbox's file system, in mount order. The
    system and interpreter paths are bound; a deny path that lies under one of them is masked,
    and the interpreter paths under that mask bound again; the data paths come last, so they
    are masked wherever they are, under the interpreter's own prefix included."""
    layers: list[tuple[str, str]] = []

    def add(kind: str, paths: list[str]) -> None:
        for p in paths:
            if (_layer_of(p, layers) == "bind") != (kind == "bind"):
                layers.append((kind, p))

    add("bind", [*system, *binds])
    add("mask", deny)
    add("bind", binds)
    add("mask", data)
    return layers


def _parent_dirs(path: str, layers: list[tuple[str, str]], made: set[str]) -> list[str]:
    """bwrap arguments that create the missing parents of a bind target as 0755 dirs (bwrap
    makes them 0700 and root's: a call could not reach an interpreter under /root/.pyenv)."""
    args: list[str] = []
    for parent in reversed(Path(path).parents):
        d = str(parent)
        if d == "/" or d in made or _layer_of(d, layers) == "bind":
            continue
        args += ["--perms", "0755", "--dir", d]
        made.add(d)
    return args


def _data_fd(content: bytes, fds: list[int]) -> str:
    """A file descriptor bwrap reads `content` from (for --ro-bind-data), kept in `fds`."""
    fd = os.memfd_create("spear-sandbox")
    fds.append(fd)
    os.write(fd, content)
    os.lseek(fd, 0, os.SEEK_SET)
    return str(fd)


@dataclasses.dataclass
class _Launch:
    """How to start one server: its command, environment and options (sent on its stdin), and
    the file descriptors bwrap reads mount contents from (closed here once it started)."""

    argv: list[str]
    env: dict[str, str]
    options: dict
    fds: list[int]


class _ServerProcess:
    """One running server: the process, a reader thread that pairs replies with calls, and a
    thread that keeps the tail of its stderr. The process is spawned from the reader thread,
    which lives as long as the server, because bwrap's --die-with-parent follows the thread."""

    def __init__(self, launch: _Launch, hidden: tuple[str, ...]):
        self._launch = launch
        self.hidden = hidden  # the paths this server's mounts hide
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
        launch = self._launch
        try:
            self.proc = subprocess.Popen(
                launch.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=launch.env,
                start_new_session=True,  # a Ctrl-C in the terminal is not meant for the sandbox
                close_fds=True,
                pass_fds=launch.fds,
            )
        except OSError as e:
            self.error = f"sandbox: cannot start {launch.argv[0]}: {e}"
            self.ready.set()
            return
        finally:
            for fd in launch.fds:
                os.close(fd)
        threading.Thread(target=self._drain_stderr, name="sandbox-stderr", daemon=True).start()
        reason = "sandbox server exited"
        try:
            self._send_options(launch.options)
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

    def _send_options(self, options: dict) -> None:
        body = json.dumps(options).encode()
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(OSError):  # a server that died says why on stderr
            self.proc.stdin.write(_HDR.pack(len(body)) + body)
            self.proc.stdin.flush()

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

    def retire(self, poll_s: float = 0.05) -> None:
        """Close once every call in flight has its reply (a server replaced by a new one). Each
        caller waits a bounded time and kills a server that does not answer, so this ends."""
        while True:
            with self._lock:
                if not self._pending or self._death is not None:
                    break
            time.sleep(poll_s)
        self.close()

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
        self.restarts = 0  # servers started because the one before died or hung
        self._lock = threading.Lock()
        self._server: _ServerProcess | None = None
        self._ids = itertools.count(1)
        self._closed = False
        self._ever_started = False
        self._starts = 0
        self._hidden: tuple[str, ...] = ()
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

    def hide(self, *paths: str) -> None:
        """Make host paths invisible to sandboxed code wherever they lie, under the interpreter's
        own directories too: an env's data files, whose answers a policy must not read. A server
        already running is replaced before the next call (calls in flight finish on it)."""
        real = {os.path.realpath(os.path.abspath(p)) for p in paths}
        if real.issubset(self._hidden):  # every env of a worker hides the same file
            return
        with self._lock:
            self._hidden = tuple(sorted(real.union(self._hidden)))

    @property
    def hidden_paths(self) -> tuple[str, ...]:
        """The host paths hide() was given (resolved), beyond sandbox.hide_paths."""
        return self._hidden

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
        if not self._current(self._server):  # starting takes seconds: do it off the loop
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

    def _current(self, srv: _ServerProcess | None) -> bool:
        """`srv` is up and hides every path hide() was given so far."""
        return srv is not None and srv.alive and srv.hidden == self._hidden

    def _ensure_server(self) -> _ServerProcess:
        srv = self._server
        if srv is not None and self._current(srv):
            return srv
        with self._lock:
            if self._closed:
                raise RuntimeError("SandboxClient is closed")
            old = self._server
            if old is not None and self._current(old):
                return old
            if old is not None and old.alive:
                logger.info("sandbox: more paths to hide; replacing the server")
            elif old is not None:
                self.restarts += 1
                logger.warning("sandbox server died (%s); starting a new one", old._death)
            srv = _ServerProcess(self._command(), self._hidden)
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
            if old is not None and old.alive:
                threading.Thread(target=old.retire, name="sandbox-retire", daemon=True).start()
            logger.info("sandbox server ready: %s", srv.info)
            return srv

    # -------------------------------------------------------------------------- command line

    def _command(self) -> _Launch:
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
            "pid_namespaces": bwrap,
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
        self._starts += 1
        if not bwrap:
            logger.warning(
                "sandbox.isolation=none: model-written code runs WITHOUT bubblewrap, seccomp or "
                "a uid drop, as this user on this host; use it only for trusted debugging"
            )
            if self._scratch_tmp is None:
                self._scratch_tmp = tempfile.mkdtemp(prefix="spear-sandbox-")
            opts["scratch_root"] = os.path.join(self._scratch_tmp, f"run{self._starts}")
            return _Launch([python, "-E", "-s", "-B", str(_SERVER_SOURCE)], env, opts, [])
        # The options go over stdin, not argv: a call's memory starts as a copy of the server's,
        # and its /proc/self/cmdline would show them.
        server_argv = [python, "-E", "-s", "-B", _SERVER_INSIDE]
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
        fds: list[int] = []
        try:
            argv = [bwrap_exe, *self._filesystem_args(python, fds)]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
        argv += ["--unshare-cgroup-try", "--hostname", "sandbox"]
        argv += ["--die-with-parent", "--new-session", "--chdir", "/", "--clearenv"]
        argv += ["--setenv", "PATH", _SYSTEM_PATH, "--setenv", "LANG", "C.UTF-8"]
        if as_root:
            argv += ["--cap-drop", "ALL"]
            for cap in _SERVER_CAPS:
                argv += ["--cap-add", cap]
        else:
            # This user is root of the user namespace: with any other uid (or --disable-userns)
            # bwrap adds a second, nested user namespace, which does not own the server's pid
            # namespace, so the zygote could not set up the calls' ones. Calls still cannot make
            # user namespaces: the seccomp filter denies unshare, setns, clone's namespace
            # flags and clone3; and each call drops every capability before its code runs.
            argv += ["--unshare-user", "--uid", "0", "--gid", "0", "--cap-drop", "ALL"]
            for cap in _USERNS_CAPS:
                argv += ["--cap-add", cap]
        return _Launch([*argv, "--", *server_argv], env, opts, fds)

    def _filesystem_args(self, python: str, fds: list[int]) -> list[str]:
        """bwrap's mounts: an empty read-only root with the system dirs, a few files of /etc,
        the interpreter's paths, masks over the hidden paths, and a private /tmp, /dev/shm,
        /dev and /proc. Contents bwrap reads from a file descriptor are appended to `fds`."""
        cfg = self.config
        project = _project_root()
        try:
            binds = _interpreter_binds(python, cfg, project)
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxUnavailableError(f"sandbox: cannot run python {python!r}: {e}") from e
        data = [p for p in sorted(self._hidden, key=len) if os.path.exists(p)]
        for d in data:
            held = [b for b in binds if _under(b, d)]
            if held:
                raise SandboxUnavailableError(
                    f"sandbox: hidden path {d} holds the interpreter's {held[0]}; move the data "
                    "files out of the interpreter's directories"
                )
        system = [p for p in (*_SYSTEM_PATHS, *_ETC_PATHS) if os.path.lexists(p)]
        deny = [os.path.realpath(p) for p in (*cfg.hide_paths, project or "") if p]
        deny = [p for p in deny if os.path.exists(p)]  # a mount point must exist
        tmp_bytes = str(cfg.tmp_size_mb * 2**20)
        args = ["--dev", "/dev", "--proc", "/proc"]
        args += ["--perms", "0755", "--size", tmp_bytes, "--tmpfs", "/tmp"]
        args += ["--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/dev/shm"]
        args += ["--perms", "0755", "--dir", "/etc"]
        made = {"/dev", "/proc", "/tmp", "/etc"}
        masks: list[str] = []
        layers = _mount_plan(system, binds, deny, data)
        for i, (kind, p) in enumerate(layers):
            if kind == "bind":
                args += _parent_dirs(p, layers[:i], made)
                link = os.path.islink(p)  # merged /usr: /bin -> usr/bin
                args += ["--symlink", os.readlink(p), p] if link else ["--ro-bind", p, p]
            elif os.path.isdir(p):
                args += ["--perms", "0755", "--tmpfs", p]
                masks.append(p)
            else:  # a file: an empty one in its place
                args += ["--perms", "0444", "--ro-bind-data", _data_fd(b"", fds), p]
        for path, text in _ETC_STUBS:
            args += ["--perms", "0644", "--ro-bind-data", _data_fd(text.encode(), fds), path]
        args += ["--ro-bind", str(_SERVER_SOURCE), _SERVER_INSIDE]  # just this one file
        for p in ["/", *masks]:  # nothing is writable but /tmp and /dev/shm
            args += ["--remount-ro", p]
        return args
