"""Fork-server that runs model-written Python snippets; one per node, inside bubblewrap.

The client (client.py) starts it as `python -E -s -B server.py`, inside bwrap (which sees this
one file, read-only, at /tmp/.spear-sandbox/server.py) unless `sandbox.isolation: none`. It
imports nothing from spear_ray (the project tree is not visible inside the sandbox): only the
standard library and PyPI `pyseccomp`.

Wire protocol, over the server's stdin (requests) and stdout (replies):
  every message is one frame: a 4-byte big-endian unsigned length N, then N bytes of UTF-8 JSON.
  client -> server, once, first: the options (limits, uid_base, ...; see client._command). Not
      on the command line: a call starts as a copy of this process, argv and /proc/self/cmdline
      included.
  server -> client, once, first:
      {"ready": true, "pid": int, "zygote_pid": int, "uid_isolation": bool, "seccomp": bool,
       "pid_namespaces": bool, "preloaded": [str], "hugepages_mb": int}
       (pids as seen inside the sandbox)
   or {"fatal": "<one-line reason>"}, after which the server exits.
  client -> server:  {"id": int, "code": str, "timeout_s": float}
  server -> client:  {"id": int, "stdout": str, "stderr": str, "exit_code": int | null,
                      "timed_out": bool, "wall_s": float, "stdout_truncated": bool,
                      "stderr_truncated": bool, "infra_error": str | null}
  Replies come in completion order; the id pairs them with requests. `exit_code` is negative
  (minus the signal number) for a call killed by a signal. EOF on stdin shuts the server down
  and kills whatever is still running.

Processes (all inside one bwrap: own pid/net/ipc/uts namespaces; a read-only root that holds
only the system dirs, a few files of /etc and the interpreter; private /tmp):
  server   root with six capabilities (bwrap drops the rest). Talks to the client, owns the
           pipes, timeouts, output caps and scratch dirs. Never forks per call, so the pages it
           writes are never shared copy-on-write with a call.
  zygote   forked once; pre-imports math/numpy/sympy, freezes the GC, backs its heap with huge
           pages, then only forks: one process per call. It never sees a call's code or output.
  janitor  deletes finished scratch dirs in the background.
  call     one process per call, forked ahead of time ("warm") so the fork is off the call's
           latency: the init (pid 1) of a pid namespace of its own, with its own mount namespace
           and /proc, so it sees its own process tree only; new session (process group = its
           pid); fds 0-4 = /dev/null, stdout pipe, stderr pipe, status pipe, code socket, every
           other fd closed; rlimits; uid/gid uid_base+slot with no groups (without root: no
           capabilities left); seccomp filter; clean env. It then blocks until the server sends
           the code (a memfd over the socket), says "started" on the status pipe, closes it,
           and exec()s the code like `python -c`.
A call's slot has its own uid, so calls cannot signal, trace or read each other. When the call's
process exits, the kernel kills what is left in its pid namespace; the server also kills every
process left under the slot's uid, replies, and frees the slot. A call whose process died
before saying "started" is an infrastructure failure, never the model's. Being an init, a call
ignores the signals it sends itself whose action is the default (kill(getpid(), SIGTERM) does
nothing, os.abort() ends in SIGSEGV, CPU time past the soft limit in SIGKILL at the hard one).
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import ctypes
import errno
import gc
import json
import linecache
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
from collections import deque

_HDR = struct.Struct(">I")
_MAX_FRAME = 256 * 2**20
_READ_CHUNK = 65536
_DRAIN_AFTER_EXIT_S = 1.0  # how long to wait for pipe EOF once the call's processes are gone
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1
_CLONE_NS_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
# Syscalls model code never needs and that open ways out of the sandbox or into the kernel's
# less-travelled paths. Most need capabilities the child does not have; the filter is the second
# lock on each door. Names unknown on this architecture are skipped.
_DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup", "lookup_dcookie",
    "iopl", "ioperm", "uselib", "sethostname", "setdomainname", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "fanotify_init", "nfsservctl", "personality",
)  # fmt: skip
_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C
_CLONE_NEWNS, _CLONE_NEWPID = 0x00020000, 0x20000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------------------------------- framing


def _write_frame(fd: int, obj: dict) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    view = memoryview(_HDR.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fatal(fd: int, msg: str) -> int:
    _write_frame(fd, {"fatal": " ".join(msg.split())})
    return 1


# ---------------------------------------------------------------------------------------- seccomp


class _SeccompProgram:
    """The filter compiled to BPF once in the server; each child installs it with one prctl
    (libseccomp would regenerate the program in every child: ~3 ms a call)."""

    _PR_SET_NO_NEW_PRIVS = 38
    _PR_SET_SECCOMP = 22
    _SECCOMP_MODE_FILTER = 2

    class _FProg(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    def __init__(self, bpf: bytes):
        if not bpf or len(bpf) % 8:
            raise ValueError(f"bad BPF program of {len(bpf)} bytes")
        self._buf = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = self._FProg(len(bpf) // 8, ctypes.addressof(self._buf))
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.prctl.argtypes = (
            ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong
        )  # fmt: skip
        self._libc.prctl.restype = ctypes.c_int
        self._prctl = self._libc.prctl

    def load(self) -> None:
        if self._prctl(self._PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        prog = ctypes.cast(ctypes.byref(self._prog), ctypes.c_void_p)
        if self._prctl(self._PR_SET_SECCOMP, self._SECCOMP_MODE_FILTER, prog, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def _build_seccomp_filter() -> _SeccompProgram:
    """The syscall filter every child runs under (default allow, a deny list)."""
    import pyseccomp as sc

    filt = sc.SyscallFilter(sc.ALLOW)
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # 32-bit / x32 syscalls kill the call
    eperm = sc.ERRNO(errno.EPERM)
    for name in _DENIED_SYSCALLS:
        nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
        if nr < 0 and nr > -1000:  # __NR_SCMP_ERROR: not a syscall on this architecture
            continue
        try:
            filt.add_rule(eperm, name)
        except OSError:
            continue
    # Only AF_UNIX sockets (multiprocessing needs socketpair); no TCP/UDP/netlink/packet at all.
    for name in ("socket", "socketpair"):
        filt.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), name, sc.Arg(0, sc.NE, socket.AF_UNIX))
    # No new namespaces through clone(); clone3 passes flags in memory the filter cannot read,
    # so it reports ENOSYS and glibc falls back to clone.
    for flag in _CLONE_NS_FLAGS:
        filt.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    with contextlib.suppress(OSError):
        filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for request in (_TIOCSTI, _TIOCLINUX):  # typing into a terminal
        filt.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    r, w = os.pipe()
    try:
        with open(w, "wb", closefd=False) as f:
            filt.export_bpf(f)
        os.close(w)
        w = -1
        bpf = b""
        while chunk := os.read(r, 65536):
            bpf += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    program = _SeccompProgram(bpf)
    _check_program_in_child(program)
    return program


def _check_program_in_child(program: _SeccompProgram) -> None:
    """Install the program in a throwaway child and check that it denies a TCP socket."""
    pid = os.fork()
    if pid == 0:
        try:
            program.load()
            try:
                socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                os._exit(3)
            except OSError as e:
                os._exit(0 if e.errno == errno.EAFNOSUPPORT else 4)
        except BaseException:
            os._exit(5)
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"the seccomp filter does not work here (check exit status {status})")


# ------------------------------------------------------------------------------------ namespaces


def _check_libc(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class _PidNamespaces:
    """Makes the zygote's next child the init of a new pid namespace, so that a call sees its
    own processes only: never the server's, whose /proc entries show how the sandbox is set up.
    unshare(CLONE_NEWPID) works only while the zygote's children go to its own namespace, so
    each time it first goes back there (setns)."""

    def __init__(self) -> None:
        self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def next_child_in_a_new_one(self) -> None:
        _check_libc(_libc.setns(self._own, _CLONE_NEWPID), "setns(pid)")
        _check_libc(_libc.unshare(_CLONE_NEWPID), "unshare(CLONE_NEWPID)")


def _mount_own_proc() -> None:
    """In the init of a new pid namespace: a mount namespace whose /proc shows that pid
    namespace only (the mount covers the server's /proc, and the call may not unmount it)."""
    _check_libc(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    private = ctypes.c_ulong(_MS_REC | _MS_PRIVATE)
    _check_libc(_libc.mount(None, b"/", None, private, None), "mount(private)")
    flags = ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _check_libc(_libc.mount(b"proc", b"/proc", b"proc", flags, None), "mount(/proc)")


def _check_pid_namespaces(namespaces: _PidNamespaces) -> None:
    """Make one throwaway child the way every call will be made and check what it sees."""
    namespaces.next_child_in_a_new_one()
    pid = os.fork()
    if pid == 0:
        try:
            _mount_own_proc()
            os._exit(0 if [p for p in os.listdir("/proc") if p.isdigit()] == ["1"] else 3)
        except BaseException:
            traceback.print_exc()
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"a call's own pid namespace and /proc do not work here ({status})")


def _drop_capabilities() -> None:
    """Without root the sandbox's user namespace gives the server capabilities, and a uid drop
    does not take them away: empty the bounding, ambient, permitted and effective sets."""
    zero = ctypes.c_ulong(0)
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(cap), zero, zero, zero) != 0:
            if ctypes.get_errno() == errno.EINVAL:  # past the last capability of this kernel
                break
            _check_libc(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    clear_all = ctypes.c_ulong(_PR_CAP_AMBIENT_CLEAR_ALL)
    _check_libc(_libc.prctl(_PR_CAP_AMBIENT, clear_all, zero, zero, zero), "ambient caps")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check_libc(_libc.capset(header, data), "capset")


# ------------------------------------------------------------------------------------------ calls

_SPAWN = struct.Struct("<qII")  # server -> zygote: process key, uid, scratch number; + 4 fds
_EVENT = struct.Struct("<Bqq")  # zygote -> server: kind, key or pid, pid or wait status
_SPAWNED, _EXITED, _SPAWN_FAILED = 1, 2, 3


class _Request:
    __slots__ = ("code", "id", "timeout_s")

    def __init__(self, req_id: int, code: str, timeout_s: float):
        self.id, self.code, self.timeout_s = req_id, code, timeout_s


class _Call:
    """One sandboxed process and, once dispatched, the request it runs. Processes are forked
    ahead of time ("warm"): locked down and waiting for their code on a socket."""

    __slots__ = (
        "code_sock", "deadline", "err", "err_fd", "err_n", "exit_code", "exited_at", "fds_open",
        "id", "key", "kill_note", "out", "out_fd", "out_n", "pid", "scratch", "slot", "started",
        "status_fd", "t0", "timed_out", "timeout_s", "uid",
    )  # fmt: skip

    def __init__(self, key: int, slot: int, uid: int, scratch: str, cap: int):
        self.key, self.slot, self.uid, self.scratch = key, slot, uid, scratch
        self.id: int | None = None  # request id once dispatched
        self.timeout_s = 0.0
        self.pid = 0
        self.code_sock: socket.socket | None = None
        self.t0 = 0.0
        self.deadline = 0.0
        self.exited_at = 0.0
        self.exit_code: int | None = None
        self.timed_out = False
        self.started = False  # the process got its code and is running it
        self.kill_note = ""
        self.out = bytearray(cap)
        self.err = bytearray(cap)
        self.out_n = 0  # bytes the program wrote (kept + dropped)
        self.err_n = 0
        self.out_fd = -1
        self.err_fd = -1
        self.status_fd = -1
        self.fds_open = 0


def _status_to_exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class Server:
    def __init__(self, opts: dict, proto_in: int, proto_out: int, devnull: int):
        self.o = opts
        self.proto_in = proto_in
        self.proto_out = proto_out
        self.devnull = devnull
        self.uid_iso: bool = opts["uid_isolation"]
        self.cap = int(opts["max_output_bytes"])
        self.kill_bytes = int(opts["output_kill_bytes"])
        self.warm_target = int(opts.get("warm_children", 0))
        self.scratch_root = opts["scratch_root"]
        self.trash_root = opts["scratch_root"] + "-trash"
        self.program: _SeccompProgram | None = None
        self.zygote_pid = 0
        self.zygote_sock: socket.socket | None = None
        self.janitor_pid = 0
        self.janitor_fd = -1
        self.free_slots = deque(range(int(opts["max_concurrent"])))
        self.queue: deque[_Request] = deque()
        self.calls: dict[int, _Call] = {}  # key -> every process we forked and still track
        self.idle: deque[_Call] = deque()  # warm processes without a request
        self.by_pid: dict[int, _Call] = {}
        self.by_fd: dict[int, tuple[_Call, str]] = {}
        self.inbuf = bytearray()
        self.sel = selectors.DefaultSelector()
        self.mypid = os.getpid()
        self.n_spawned = 0
        self.discard = bytearray(_READ_CHUNK)

    # ----------------------------------------------------------------------------- setup

    def start_zygote(self) -> dict:
        """Fork the zygote and wait for its hello (what it pre-imported)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                ours.close()
                _die_with_parent()
                os.close(self.proto_in)
                os.close(self.proto_out)
                rc = _Zygote(self.o, theirs, self.program, self.devnull).serve()
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(rc)
        theirs.close()
        self.zygote_pid, self.zygote_sock = pid, ours
        hello = ours.recv(65536)
        if not hello:
            raise RuntimeError("the zygote died while starting (see the server's stderr)")
        return json.loads(hello)

    def start_janitor(self) -> None:
        """A helper that deletes finished scratch dirs, so a call that made 10^6 files cannot
        stall the event loop."""
        for d, mode in ((self.scratch_root, 0o711), (self.trash_root, 0o700)):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, mode)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                _die_with_parent()
                os.dup2(self.devnull, 0)
                os.dup2(2, 1)
                os.dup2(r, 3)
                os.closerange(4, 1 << 20)
                with os.fdopen(3, "rb") as f:
                    for line in f:
                        shutil.rmtree(line.rstrip(b"\n").decode(), ignore_errors=True)
            finally:
                os._exit(0)
        os.close(r)
        os.set_blocking(w, False)
        self.janitor_pid, self.janitor_fd = pid, w

    # ----------------------------------------------------------------------------- loop

    def serve(self) -> int:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of calls come back to us, not to bwrap
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w)
        assert self.zygote_sock is not None
        self.zygote_sock.setblocking(False)
        os.set_blocking(self.proto_in, False)
        self.sel.register(self.proto_in, selectors.EVENT_READ, "proto")
        self.sel.register(self.zygote_sock, selectors.EVENT_READ, "zygote")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        self._refill_warm()
        while True:
            timeout = None
            busy = [c for c in self.calls.values() if c.id is not None or c.exit_code is not None]
            if busy:
                now = time.monotonic()
                timeout = max(0.0, min(self._next_deadline(c) for c in busy) - now)
            for key, _ in self.sel.select(timeout):
                tag = key.data
                if tag == "proto":
                    if not self._read_requests():
                        self._shutdown()
                        return 0
                elif tag == "zygote":
                    if not self._read_zygote():
                        print("sandbox: the zygote died", file=sys.stderr)
                        self._shutdown()
                        return 1
                elif tag == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 4096):
                            pass
                    self._reap_orphans()
                else:
                    self._read_output(key.fd)
            self._check_deadlines()
            self._finish_ready()
            self._start_queued()
            self._refill_warm()

    def _next_deadline(self, call: _Call) -> float:
        if call.exit_code is not None:
            return call.exited_at + _DRAIN_AFTER_EXIT_S
        if call.timed_out or call.kill_note or not call.pid:  # waiting on the zygote: no spin
            return time.monotonic() + 0.05
        return call.deadline

    def _read_requests(self) -> bool:
        while True:
            try:
                chunk = os.read(self.proto_in, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                return False
            self.inbuf += chunk
        while len(self.inbuf) >= 4:
            (n,) = _HDR.unpack_from(self.inbuf)
            if n > _MAX_FRAME:
                raise RuntimeError(f"request frame of {n} bytes")
            if len(self.inbuf) < 4 + n:
                break
            msg = json.loads(bytes(self.inbuf[4 : 4 + n]))
            del self.inbuf[: 4 + n]
            self.queue.append(_Request(int(msg["id"]), str(msg["code"]), float(msg["timeout_s"])))
        return True

    def _read_zygote(self) -> bool:
        assert self.zygote_sock is not None
        while True:
            try:
                msg = self.zygote_sock.recv(_EVENT.size)
            except BlockingIOError:
                return True
            if not msg:
                return False
            kind, a, b = _EVENT.unpack(msg)
            if kind == _SPAWNED:
                call = self.calls.get(a)
                if call is not None:
                    call.pid = b
                    self.by_pid[b] = call
                    if call.timed_out or call.kill_note:  # killed before we knew its pid
                        self._kill(call)
            elif kind == _EXITED:
                call = self.by_pid.pop(a, None)
                if call is not None:
                    call.exit_code = _status_to_exit_code(b)
                    call.exited_at = time.monotonic()
                    self._sweep(call)
            elif kind == _SPAWN_FAILED:
                call = self.calls.get(a)
                if call is not None:
                    call.exit_code, call.exited_at = 126, time.monotonic()
                    os.write(2, f"sandbox: fork failed: {os.strerror(b)}\n".encode())

    def _start_queued(self) -> None:
        while self.queue:
            call = self._take_idle()
            if call is None:
                if not self.free_slots:
                    return
                try:
                    call = self._spawn()
                except OSError as e:  # e.g. no memory for a pipe: an infrastructure problem
                    req = self.queue.popleft()
                    self._reply_infra(req, f"sandbox could not start the call: {e}")
                    continue
            self._dispatch(call, self.queue.popleft())

    def _take_idle(self) -> _Call | None:
        while self.idle:
            call = self.idle.popleft()
            if call.exit_code is None:
                return call
        return None

    def _refill_warm(self) -> None:
        if self.queue:
            return
        while len(self.idle) < self.warm_target and self.free_slots:
            try:
                self.idle.append(self._spawn())
            except OSError as e:
                print(f"sandbox: could not fork a warm process: {e}", file=sys.stderr)
                return

    # ----------------------------------------------------------------------------- one call

    def _spawn(self) -> _Call:
        """Ask the zygote for a locked-down process on a free slot; it waits for its code."""
        slot = self.free_slots.popleft()
        self.n_spawned += 1
        key = self.n_spawned
        uid = int(self.o["uid_base"]) + slot
        call = _Call(key, slot, uid, f"{self.scratch_root}/{key}", self.cap)
        theirs: list[int] = []
        try:
            os.mkdir(call.scratch, 0o700)
            if self.uid_iso:
                os.chown(call.scratch, uid, uid)
            ours_sock, their_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            call.code_sock = ours_sock
            theirs.append(their_sock.detach())
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            theirs.append(out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            theirs.append(err_w)
            st_r, st_w = os.pipe2(os.O_CLOEXEC)
            theirs.append(st_w)
            self.calls[key] = call
            call.out_fd, call.err_fd, call.status_fd = out_r, err_r, st_r
            for fd, which in ((out_r, "out"), (err_r, "err"), (st_r, "status")):
                os.set_blocking(fd, False)
                self.by_fd[fd] = (call, which)
                self.sel.register(fd, selectors.EVENT_READ, which)
                call.fds_open += 1
            assert self.zygote_sock is not None
            self.zygote_sock.setblocking(True)
            try:
                socket.send_fds(self.zygote_sock, [_SPAWN.pack(key, uid, key)], theirs)
            finally:
                self.zygote_sock.setblocking(False)
        except OSError:
            self._release(call)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return call

    def _dispatch(self, call: _Call, req: _Request) -> None:
        """Hand a request to a (warm or fresh) process: its code goes over in a memfd."""
        call.id, call.timeout_s = req.id, req.timeout_s
        call.t0 = time.monotonic()
        call.deadline = call.t0 + req.timeout_s
        memfd = os.memfd_create("code", os.MFD_CLOEXEC)
        try:
            data = memoryview(req.code.encode("utf-8", "surrogatepass"))
            while data:
                data = data[os.write(memfd, data) :]
            assert call.code_sock is not None
            socket.send_fds(call.code_sock, [b"c"], [memfd])
        except OSError:
            pass  # the process died while warm: it reports no start, so the reply is infra
        finally:
            os.close(memfd)
            if call.code_sock is not None:
                call.code_sock.close()
                call.code_sock = None

    def _close_call_fds(self, call: _Call) -> None:
        for fd in (call.out_fd, call.err_fd, call.status_fd):
            if fd >= 0:
                self._close_fd(fd)
        if call.code_sock is not None:
            call.code_sock.close()
            call.code_sock = None

    def _read_output(self, fd: int) -> None:
        call, which = self.by_fd[fd]
        if which == "status":
            try:
                data = os.read(fd, 16)
            except BlockingIOError:
                return
            if data:
                call.started = True
            else:
                self._close_fd(fd)
            return
        buf = call.out if which == "out" else call.err
        have = call.out_n if which == "out" else call.err_n
        while True:
            bufs = [memoryview(buf)[have:], self.discard] if have < self.cap else [self.discard]
            try:
                n = os.readv(fd, bufs)
            except BlockingIOError:
                break
            if n == 0:
                self._close_fd(fd)
                break
            have += n
            if n < sum(len(b) for b in bufs):
                break
        if which == "out":
            call.out_n = have
        else:
            call.err_n = have
        if call.out_n + call.err_n > self.kill_bytes and not call.kill_note:
            call.kill_note = (
                f"\n[sandbox] killed: the call wrote more than {self.kill_bytes} bytes of output\n"
            )
            self._kill(call)

    def _close_fd(self, fd: int) -> None:
        call, which = self.by_fd.pop(fd)
        self.sel.unregister(fd)
        os.close(fd)
        setattr(call, f"{which}_fd", -1)  # the number may be reused by the next call's pipes
        call.fds_open -= 1

    def _reap_orphans(self) -> None:
        """Reap what was re-parented to us (orphans of calls) and notice helpers dying."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.janitor_pid:
                self.janitor_pid, self.janitor_fd = 0, -1
            elif pid == self.zygote_pid:
                self.zygote_pid = 0  # its socket reports EOF; serve() exits

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for call in self.calls.values():
            if call.id is None or call.exit_code is not None or call.timed_out:
                continue
            if now >= call.deadline:
                call.timed_out = True
                if call.pid:
                    self._kill(call)

    def _kill(self, call: _Call) -> None:
        if call.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(call.pid, signal.SIGKILL)
        self._sweep(call)

    def _sweep(self, call: _Call) -> None:
        """Kill every process left over from this call, including those that left its process
        group (setsid). With per-slot uids that is 'every process of this uid'; without, the
        orphans that were re-parented to the server."""
        known = {1, self.mypid, self.janitor_pid, self.zygote_pid, *self.by_pid}
        for _ in range(100):
            found = []
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) in known:
                    continue
                pid = int(name)
                try:
                    if self.uid_iso:
                        with open(f"/proc/{pid}/status", "rb") as f:
                            st = f.read()
                        i = st.find(b"\nUid:")
                        j = st.find(b"\nState:")
                        alive = st[j + 8 : j + 9] != b"Z"
                        if alive and int(st[i + 5 :].split(None, 1)[0]) == call.uid:
                            found.append(pid)
                    else:
                        with open(f"/proc/{pid}/stat", "rb") as f:
                            fields = f.read().rsplit(b")", 1)[1].split()
                        if int(fields[1]) == self.mypid and fields[0] != b"Z":
                            found.append(pid)
                except (OSError, ValueError, IndexError):
                    continue
            if not found:
                return
            for pid in found:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)
            self._reap_orphans()
        print(f"sandbox: could not clear the processes of slot {call.slot}", file=sys.stderr)

    def _finish_ready(self) -> None:
        now = time.monotonic()
        for call in list(self.calls.values()):
            if call.exit_code is None:
                continue
            if call.fds_open and now < call.exited_at + _DRAIN_AFTER_EXIT_S:
                continue
            if call.id is not None:
                infra = None
                if not call.started and not call.timed_out:
                    infra = f"sandbox process failed before running the code (exit " \
                        f"{call.exit_code}): {_tail(call.err)}"  # fmt: skip
                self._reply(call, infra_error=infra)
            else:
                print(f"sandbox: a warm process died (exit {call.exit_code}): {_tail(call.err)}",
                      file=sys.stderr)  # fmt: skip
            self._release(call)

    def _release(self, call: _Call) -> None:
        if call in self.idle:
            self.idle.remove(call)
        self._close_call_fds(call)
        self.calls.pop(call.key, None)
        if call.pid:
            self.by_pid.pop(call.pid, None)
        self._discard_scratch(call)
        self.free_slots.append(call.slot)

    def _reply(self, call: _Call, infra_error: str | None = None) -> None:
        out_kept, err_kept = min(call.out_n, self.cap), min(call.err_n, self.cap)
        end = call.exited_at or time.monotonic()
        _write_frame(
            self.proto_out,
            {
                "id": call.id,
                "stdout": call.out[:out_kept].decode("utf-8", "replace"),
                "stderr": call.err[:err_kept].decode("utf-8", "replace") + call.kill_note,
                "exit_code": call.exit_code,
                "timed_out": call.timed_out,
                "wall_s": round(end - call.t0, 6) if call.t0 else 0.0,
                "stdout_truncated": call.out_n > self.cap,
                "stderr_truncated": call.err_n > self.cap,
                "infra_error": infra_error,
            },
        )

    def _reply_infra(self, req: _Request, message: str) -> None:
        _write_frame(
            self.proto_out,
            {
                "id": req.id, "stdout": "", "stderr": "", "exit_code": None, "timed_out": False,
                "wall_s": 0.0, "stdout_truncated": False, "stderr_truncated": False,
                "infra_error": message,
            },
        )  # fmt: skip

    def _discard_scratch(self, call: _Call) -> None:
        if self.uid_iso:  # the sandbox's private /dev/shm is the one other writable place
            with contextlib.suppress(OSError), os.scandir("/dev/shm") as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_uid == call.uid:
                            if entry.is_dir(follow_symlinks=False):
                                shutil.rmtree(entry.path, ignore_errors=True)
                            else:
                                os.unlink(entry.path)
        try:
            os.rmdir(call.scratch)  # the common case: the call left no files
            return
        except FileNotFoundError:
            return
        except OSError:
            pass
        trash = f"{self.trash_root}/{call.key}"
        try:
            os.rename(call.scratch, trash)  # instant; the janitor deletes the contents
            if self.janitor_fd >= 0:
                os.write(self.janitor_fd, trash.encode() + b"\n")
                return
        except OSError:
            trash = call.scratch if os.path.exists(call.scratch) else trash
        shutil.rmtree(trash, ignore_errors=True)

    def _shutdown(self) -> None:
        for call in list(self.calls.values()):
            self._kill(call)
            self._discard_scratch(call)
        if self.zygote_pid:
            with contextlib.suppress(OSError):
                os.kill(self.zygote_pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------- zygote


class _Zygote:
    """Forks one process per call. Its loop touches few pages, so the huge pages backing the
    pre-imported modules stay intact and each fork copies few page-table entries."""

    def __init__(self, opts: dict, sock: socket.socket, program, devnull: int):
        self.o = opts
        self.sock = sock
        self.program = program
        self.devnull = devnull
        self.children: dict[int, int] = {}  # pid -> key
        self.namespaces = _PidNamespaces() if opts.get("pid_namespaces") else None
        self.child_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "USER": "sandbox",
            "LOGNAME": "sandbox",
        }

    def serve(self) -> int:
        if self.namespaces is not None:
            try:
                _check_pid_namespaces(self.namespaces)
            except (OSError, RuntimeError) as e:
                fatal = f"sandbox: {e}; bubblewrap must let the server keep CAP_SYS_ADMIN"
                self.sock.send(json.dumps({"fatal": fatal}).encode())
                return 1
        sys.path[0] = ""  # like `python -c`: calls import from their cwd, not from our dir
        preloaded = []
        for name in self.o["preload"]:
            try:
                __import__(name)
                preloaded.append(name)
            except Exception:
                pass
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # inherited by every call: the OOM killer takes a call first
        os.environ.clear()  # what every call sees (each adds HOME and TMPDIR)
        os.environ.update(self.child_env)
        # Calls print through these very objects (fd 1 and 2 become the call's pipes).
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            stream.reconfigure(encoding="utf-8", errors="backslashreplace")
        sys.stderr.reconfigure(line_buffering=True)
        gc.collect()
        gc.freeze()  # keeps the collector from touching (and copying) these pages in children
        huge = _collapse_heap_to_hugepages() if self.o.get("hugepages", True) else 0
        self.sock.send(json.dumps({"preloaded": preloaded, "hugepages_mb": huge >> 20}).encode())
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        sel.register(wake_r, selectors.EVENT_READ, None)
        sock_fd = self.sock.fileno()
        while True:
            for key, _ in sel.select():
                if key.fd == sock_fd:
                    try:
                        msg, fds, _, _ = socket.recv_fds(self.sock, _SPAWN.size, 4)
                    except InterruptedError:
                        continue
                    if not msg:
                        return 0  # the server is gone
                    self._spawn(msg, fds)
                else:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 4096):
                            pass
            while self.children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if self.children.pop(pid, None) is not None:
                    self.sock.send(_EVENT.pack(_EXITED, pid, status))

    def _spawn(self, msg: bytes, fds: list[int]) -> None:
        key, uid, scratch_no = _SPAWN.unpack(msg)
        try:
            if self.namespaces is not None:
                self.namespaces.next_child_in_a_new_one()
            pid = os.fork()
        except OSError as e:
            for fd in fds:
                os.close(fd)
            self.sock.send(_EVENT.pack(_SPAWN_FAILED, key, e.errno or 0))
            return
        if pid == 0:  # the call's process: never returns
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _child_main(self, uid, f"{self.o['scratch_root']}/{scratch_no}", fds)
            except BaseException:
                traceback.print_exc()  # fd 2 is the call's stderr pipe by now
            finally:
                os._exit(126)
        for fd in fds:
            os.close(fd)
        self.children[pid] = key
        self.sock.send(_EVENT.pack(_SPAWNED, key, pid))


# ------------------------------------------------------------------------------------ child side


def _child_main(zygote: _Zygote, uid: int, scratch: str, fds: list[int]) -> None:
    """Lock this process down, wait for the code, run it."""
    code_sock, out_w, err_w, st_w = fds
    os.setsid()
    os.dup2(zygote.devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.dup2(st_w, 3, inheritable=False)
    os.dup2(code_sock, 4, inheritable=False)
    os.closerange(5, 1 << 20)  # the zygote's socket and wakeup pipe, anything else inherited
    os.umask(0o077)
    os.chdir(scratch)
    o = zygote.o
    if o["pid_namespaces"]:
        _mount_own_proc()
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_CPU, int(o["cpu_seconds"]), int(o["cpu_seconds"]) + 1)
    _limit(resource.RLIMIT_AS, int(o["memory_bytes"]))
    _limit(resource.RLIMIT_NOFILE, int(o["max_open_files"]))
    _limit(resource.RLIMIT_FSIZE, int(o["max_file_bytes"]))
    _limit(resource.RLIMIT_MEMLOCK, 0)
    uid_iso = bool(o["uid_isolation"])
    if uid_iso:
        _limit(resource.RLIMIT_NPROC, int(o["max_processes"]))
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
            raise RuntimeError("the uid drop did not take")
    elif o["pid_namespaces"]:  # root of a user namespace: no uid drop clears the capabilities
        _drop_capabilities()
    if zygote.program is not None:
        zygote.program.load()
    os.environ["HOME"] = os.environ["TMPDIR"] = scratch  # the rest was set in the zygote
    # Locked down: now wait (warm) for the code, which arrives as a memfd.
    with socket.socket(fileno=4) as sock:
        _, memfds, _, _ = socket.recv_fds(sock, 16, 1)
    if not memfds:
        os._exit(0)  # shut down while warm
    size = os.fstat(memfds[0]).st_size
    code = bytearray()
    while len(code) < size:
        chunk = os.pread(memfds[0], size - len(code), len(code))
        if not chunk:
            break
        code += chunk
    os.close(memfds[0])
    os.write(3, b"k")
    os.close(3)
    o.clear()  # the server's options, which the server, zygote and main() share, in our copy
    _run_user_code(code.decode("utf-8", "surrogatepass"), kill_strays=uid_iso)


def _limit(res: int, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    _, cur_hard = resource.getrlimit(res)
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    resource.setrlimit(res, (soft, hard))


def _run_user_code(code: str, kill_strays: bool) -> None:
    """Run `code` the way `python -c code` would, then exit the process."""
    me = os.getpid()
    # sys.stdin/stdout/stderr are the zygote's objects on fds 0-2, set up in _Zygote.serve.
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__
    sys.argv = ["-c"]
    atexit._clear()
    linecache.cache["<string>"] = (len(code), None, code.splitlines(True), "<string>")
    main_module = types.ModuleType("__main__")  # a fresh __main__, so pickle finds user functions
    sys.modules["__main__"] = main_module
    scope = main_module.__dict__
    scope["__builtins__"] = builtins
    rc = 0
    try:
        try:
            exec(compile(code, "<string>", "exec"), scope)
        finally:
            with contextlib.suppress(Exception):
                threading._shutdown()  # join non-daemon threads, as interpreter exit does
            atexit._run_exitfuncs()
    except SystemExit as e:
        rc = _exit_status(e)
    except BaseException as e:
        tb = e.__traceback__
        if tb is not None and tb.tb_frame.f_code is _run_user_code.__code__:
            tb = tb.tb_next  # hide this function's frame, like the interpreter hides its own
        with contextlib.suppress(BaseException):
            traceback.print_exception(type(e), e, tb)
        rc = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    if kill_strays and os.getpid() == me:
        # Every other process of this call's uid: orphans and their children.
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)
    os._exit(rc)


def _exit_status(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(BaseException):
        print(code, file=sys.stderr)
    return 1


def _tail(buf: bytearray, n: int = 300) -> str:
    text = bytes(buf).rstrip(b"\0").decode("utf-8", "replace").strip()
    return " ".join(text[-n:].split())


def _collapse_heap_to_hugepages() -> int:
    """Back the warmed-up heap with 2 MiB pages (MADV_COLLAPSE, Linux >= 6.1), so each fork
    copies a few hundred page-table entries instead of tens of thousands: fork+exit of a server
    with sympy loaded drops from ~4 ms to ~2 ms. A no-op where the kernel says no."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madv_hugepage, madv_collapse, huge = 14, 25, 2 << 20
    collapsed = 0
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    for line in maps:
        parts = line.split()
        if not parts[1].startswith("rw") or (len(parts) > 5 and parts[5] != "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        start, end = -(-lo // huge) * huge, hi // huge * huge
        if end - start < huge:
            continue
        ok = libc.madvise(start, end - start, madv_hugepage) == 0
        if ok and libc.madvise(start, end - start, madv_collapse) == 0:
            collapsed += end - start
    return collapsed


# ------------------------------------------------------------------------------------------ main


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:  # fmt: skip
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("the client closed the pipe before sending the options")
        data += chunk
    return data


def _read_options(fd: int) -> dict:
    """The client's first frame. Not argv: every call starts as a copy of this process, and its
    /proc/self/cmdline would show them."""
    (n,) = _HDR.unpack(_read_exactly(fd, _HDR.size))
    return json.loads(_read_exactly(fd, n))


def main(argv: list[str]) -> int:
    # The protocol moves off fds 0/1 so that nothing printed by accident can corrupt it.
    proto_in, proto_out = os.dup(0), os.dup(1)
    os.set_inheritable(proto_in, False)
    os.set_inheritable(proto_out, False)
    opts = _read_options(proto_in)
    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # keep the zygote single-threaded so fork() is safe
    server = Server(opts, proto_in, proto_out, devnull)
    if server.uid_iso and os.geteuid() != 0:
        return _fatal(proto_out, "sandbox: per-call uid isolation needs the server to run as root")
    if opts["seccomp"]:
        try:
            server.program = _build_seccomp_filter()
        except Exception as e:
            return _fatal(
                proto_out,
                f"sandbox: seccomp unavailable ({type(e).__name__}: {e}); install it with "
                "`pip install pyseccomp` and `apt-get install -y libseccomp2`",
            )
    server.start_janitor()
    try:
        hello = server.start_zygote()
    except Exception as e:
        return _fatal(proto_out, f"sandbox: {e}")
    if "fatal" in hello:
        return _fatal(proto_out, hello["fatal"])
    _write_frame(
        proto_out,
        {
            "ready": True,
            "pid": os.getpid(),
            "uid_isolation": server.uid_iso,
            "seccomp": server.program is not None,
            "pid_namespaces": bool(opts.get("pid_namespaces")),
            "zygote_pid": server.zygote_pid,
            **hello,
        },
    )
    return server.serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
