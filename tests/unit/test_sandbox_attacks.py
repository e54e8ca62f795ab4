"""Hostile code against the real sandbox: each attack is contained, reported, and the next
ordinary call still gets the right answer.

One server for the module (bubblewrap + seccomp + per-call uid). After each attack the host is
checked directly: no process of the sandbox's uids is left, no file appeared.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import stat
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pytest

from spear_ray.envs import make_env
from spear_ray.sandbox import SandboxClient, SandboxConfig

pytestmark = pytest.mark.sandbox  # skipped without bubblewrap and root

CFG = SandboxConfig(
    timeout_s=10,
    cpu_seconds=10,
    memory_mb=512,
    max_file_size_mb=8,
    max_processes=32,
    max_concurrent=8,
    output_kill_bytes=4 * 2**20,
    preload_modules=("math",),
    tmp_size_mb=256,
)
SECRET = "spear-test-secret-7f3a9c"
GOLD = "spear-test-gold-answer-4b1d"  # what a dataset file holds and model code must not read
# The dirs the sandbox used to hide (a deny list over a read-only view of the whole host).
OLD_HIDDEN = ("/home", "/root", "/work", "/run", "/mnt", "/media", "/srv")
_BPF_NR = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sandbox():
    os.environ["SPEAR_SANDBOX_TEST_SECRET"] = SECRET  # must not reach the sandbox
    try:
        with SandboxClient(CFG) as client:
            client.start()
            yield client
    finally:
        os.environ.pop("SPEAR_SANDBOX_TEST_SECRET", None)


@pytest.fixture(autouse=True)
def still_works_and_leaves_nothing(request):
    """After every attack: no sandbox process survives and an ordinary call is answered."""
    yield
    if "sandbox" not in request.fixturenames:
        return
    client: SandboxClient = request.getfixturevalue("sandbox")
    assert _wait_no_leftovers(client) == []
    r = client.run_python("print(sum(range(10)))")
    assert r.stdout == "45\n" and r.ok, r
    assert client.restarts == 0  # no attack took the server down


def _tree(root: int) -> list[int]:
    """Host pids of `root`'s descendants. Everything a sandbox starts stays in bwrap's tree,
    whatever pid namespace it is in (each call is the init of its own): orphans are re-parented
    to the server or to the call, never out of it."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                found += map(int, children)
                todo += map(int, children)
    return found


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _host_pid(inner_pid: int, tree: list[int]) -> int:
    """The host pid of the process of `tree` that is `inner_pid` in bwrap's pid namespace."""
    for pid in tree:
        with contextlib.suppress(OSError):
            nspids = _status(pid)["NSpid"].split()
            if len(nspids) > 1 and int(nspids[1]) == inner_pid:
                return pid
    raise LookupError(inner_pid)


def _leftover_processes(client: SandboxClient) -> list[tuple[int, int, int]]:
    """Host processes of this sandbox under one of its per-call uids, except the warm ones:
    children of the zygote, locked down and waiting for a call (at most warm_children, one per
    uid). Only this sandbox's (its tree), so another sandbox on the machine (a python_math run
    beside the tests, with the same uids) is not counted, while any orphan of this one is."""
    tree = _tree(client.server_pid or 0)
    zygote = _host_pid(client.server_info["zygote_pid"], tree)
    lo, hi = CFG.uid_base, CFG.uid_base + CFG.max_concurrent
    found, warm = [], []
    for pid in tree:
        try:
            field = _status(pid)
        except OSError:
            continue
        uid, ppid = int(field["Uid"].split()[0]), int(field["PPid"])
        if lo <= uid < hi and not field["State"].strip().startswith("Z"):
            (warm if ppid == zygote else found).append((pid, uid, ppid))
    if len(warm) > CFG.warm_children or len({uid for _, uid, _ in warm}) < len(warm):
        found += warm
    return found


def _wait_no_leftovers(client: SandboxClient, within_s: float = 3.0) -> list:
    deadline = time.monotonic() + within_s
    while (left := _leftover_processes(client)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# ------------------------------------------------------------------------------- resources


def test_infinite_loop_is_killed_at_the_timeout(sandbox):
    r = sandbox.run_python("while True:\n    pass", timeout_s=1)
    assert r.timed_out and r.exit_code == -9 and r.infra_error is None
    assert 1 <= r.wall_s < 4


def test_cpu_limit_kills_a_busy_process(sandbox):
    cfg = CFG.model_copy(update={"cpu_seconds": 1})
    with SandboxClient(cfg) as client:
        r = client.run_python("while True:\n    pass", timeout_s=8)
    assert not r.timed_out and r.exit_code in (-24, -9)  # SIGXCPU, then SIGKILL at the hard limit


def test_fork_bomb_is_capped_and_killed(sandbox):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = sandbox.run_python(code, timeout_s=2)
    assert r.timed_out and r.wall_s < 6


def test_thread_bomb_hits_the_process_limit(sandbox):
    code = (
        "import threading, time\nn = 0\ntry:\n    while True:\n"
        "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "        n += 1\nexcept Exception as e:\n    print('stopped', n, type(e).__name__)"
    )
    r = sandbox.run_python(code, timeout_s=5)
    assert r.stdout.startswith("stopped") and not r.timed_out, r
    assert int(r.stdout.split()[1]) < CFG.max_processes


@pytest.mark.parametrize(
    "code",
    [
        "x = bytearray(8 * 2**30)",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 2**20))",
        "import numpy\nx = numpy.ones(2**31)",
    ],
    ids=["one-big", "growing", "numpy"],
)
def test_memory_bomb_raises_memory_error(sandbox, code):
    r = sandbox.run_python(code, timeout_s=10)
    if "No module named 'numpy'" in r.stderr:
        pytest.skip("numpy not installed")
    assert r.exit_code == 1 and "MemoryError" in r.stderr and not r.timed_out, r


def test_huge_file_write_stops_at_the_file_size_limit(sandbox):
    code = (
        "import os\nwith open('big', 'wb') as f:\n    f.write(b'x' * (64 * 2**20))\n"
        "print(os.path.getsize('big'))"
    )
    r = sandbox.run_python(code)
    assert r.exit_code == 1 and "File too large" in r.stderr, r
    r = sandbox.run_python("import os\nprint(os.listdir('.'))")
    assert r.stdout == "[]\n"


def test_a_hundred_megabytes_of_stdout_is_capped_and_killed(sandbox):
    code = "import sys\nchunk = 'x' * 2**20\nfor _ in range(100):\n    sys.stdout.write(chunk)"
    t0 = time.monotonic()
    r = sandbox.run_python(code, timeout_s=10)
    assert time.monotonic() - t0 < 8 and not r.timed_out
    assert r.stdout_truncated and r.stdout == "x" * CFG.max_output_bytes
    assert "output" in r.stderr and r.exit_code == -9
    r = sandbox.run_python("import sys\nsys.stderr.write('e' * (100 * 2**20))", timeout_s=10)
    assert r.stderr_truncated and r.stderr.startswith("e" * 1000) and r.exit_code == -9


# ---------------------------------------------------------------------------- file system


def test_writes_outside_the_scratch_dir_fail_or_stay_inside(sandbox):
    marker = f"spear-pwned-{os.getpid()}"
    targets = [
        f"/tmp/{marker}",
        f"/var/tmp/{marker}",
        f"{PROJECT}/{marker}",
        f"/root/{marker}",
        f"/etc/{marker}",
        f"/home/{marker}",
        f"../{marker}",
        f"/usr/local/{marker}",
    ]
    code = "import os\n"
    for t in targets:
        code += (
            f"try:\n    open({t!r}, 'w').write('x')\n    print('WROTE', {t!r})\n"
            f"except OSError as e:\n    print('denied', e.errno)\n"
        )
    code += f"open('/dev/shm/{marker}', 'w').write('x')\nprint(os.listdir('/dev/shm'))"
    r = sandbox.run_python(code)
    assert "WROTE" not in r.stdout and r.stdout.count("denied") == len(targets), r
    for t in targets:
        assert not t.startswith("/") or not Path(t).exists(), t  # nothing reached the host
    assert not Path(f"/dev/shm/{marker}").exists()  # the sandbox's /dev/shm is its own
    assert marker in r.stdout
    r = sandbox.run_python("import os\nprint(os.listdir('/dev/shm'))")
    assert r.stdout == "[]\n"  # and it is emptied after each call


def test_host_files_cannot_be_read(sandbox):
    shadow = Path("/etc/shadow").read_text()
    own_files = [PROJECT / "pyproject.toml", Path(__file__), PROJECT / "spear_ray" / "__init__.py"]
    paths = ["/etc/shadow", *map(str, own_files), "/root/.bashrc", "/proc/1/root/etc/shadow"]
    code = "import os\n"
    for p in paths:
        code += (
            f"try:\n    print(open({p!r}).read())\n"
            f"except OSError as e:\n    print('denied', {p!r}, e.errno)\n"
        )
    code += f"print(sorted(os.listdir({str(PROJECT)!r})))"
    r = sandbox.run_python(code)
    assert r.stdout.count("denied") == len(paths), r
    shadow_lines = [ln for ln in shadow.splitlines() if ln.strip()]
    assert not any(ln in r.stdout for ln in shadow_lines)
    for f in own_files:
        assert f.read_text()[:200] not in r.stdout
    listing = eval(r.stdout.rstrip().splitlines()[-1])
    assert set(listing) <= {".venv"}  # an empty tmpfs, plus the interpreter if it lives there


def _read_attempts(paths: list[str]) -> str:
    code = "import os\n"
    for p in paths:
        code += (
            f"try:\n    print('READ', {p!r}, open({p!r}).read())\n"
            f"except OSError as e:\n    print('denied', {p!r}, e.errno)\n"
        )
    return code


@pytest.fixture
def dataset_outside_the_old_hidden_dirs():
    """World-readable dataset files with gold answers where clusters keep them: a top-level dir
    (like /data) and /opt, outside every dir the sandbox used to hide."""
    files, dirs = [], []
    for parent in ("/", "/opt"):
        try:
            d = tempfile.mkdtemp(prefix="data-spear-test-", dir=parent)
        except OSError:
            continue
        dirs.append(d)
        os.chmod(d, 0o755)
        f = Path(d, "train.jsonl")
        f.write_text(json.dumps({"prompt": "2+2?", "answer": GOLD}) + "\n")
        f.chmod(0o644)
        files.append(str(f))
    try:
        if not files:
            pytest.skip("cannot create a directory under / or /opt to hold a test dataset")
        yield files
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_dataset_outside_every_hidden_dir_is_invisible(
    sandbox, dataset_outside_the_old_hidden_dirs
):
    files = dataset_outside_the_old_hidden_dirs
    for f in files:  # the case the deny list missed: readable by anyone, hidden by no entry
        assert Path(f).stat().st_mode & stat.S_IROTH and GOLD in Path(f).read_text()
        assert not any(f.startswith(h + "/") for h in OLD_HIDDEN)
    parents = sorted({os.path.dirname(os.path.dirname(f)) for f in files})
    code = _read_attempts(files)
    for d in parents:
        code += (
            f"try:\n    print('LIST', {d!r}, sorted(os.listdir({d!r})))\n"
            "except OSError as e:\n    print('no dir', e.errno)\n"
        )
    r = sandbox.run_python(code)
    assert r.exit_code == 0 and r.stdout.count("denied") == len(files), r
    assert GOLD not in r.stdout, r
    listings = [line for line in r.stdout.splitlines() if line.startswith("LIST")]
    assert listings and not any("data-spear-test-" in line for line in listings), r


def test_only_the_allow_list_is_mounted(sandbox):
    r = sandbox.run_python("import os\nprint(sorted(os.listdir('/')))\nprint(os.listdir('/etc'))")
    top, etc = (set(eval(line)) for line in r.stdout.splitlines())
    system = {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "etc", "tmp", "proc", "dev"}
    # the first dir of each of the interpreter's paths (the sandbox runs this interpreter)
    interpreter = {
        Path(p).parts[1] for p in (sys.prefix, sys.base_prefix) if len(Path(p).parts) > 1
    }
    assert {"usr", "etc", "tmp", "proc", "dev"} <= top <= system | interpreter, top
    assert etc <= {"ld.so.cache", "localtime", "alternatives", "passwd", "group", "hostname"}, etc
    assert {"passwd", "ld.so.cache"} <= etc


@pytest.fixture
def dataset_under_a_visible_prefix():
    """A dataset dir inside one the sandbox shows (/usr/share, or the interpreter's
    site-packages), with the data file and an unrelated neighbour."""
    for parent in ("/usr/share", sysconfig.get_paths()["purelib"]):
        try:
            d = tempfile.mkdtemp(prefix="spear-test-data-", dir=parent)
        except OSError:
            continue
        os.chmod(d, 0o755)
        data = Path(d, "train.jsonl")
        data.write_text(json.dumps({"prompt": "What is 2+2?", "answer": GOLD}) + "\n")
        neighbour = Path(d, "README")
        neighbour.write_text("neighbour-visible\n")
        for f in (data, neighbour):
            f.chmod(0o644)
        try:
            yield data, neighbour
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return
    pytest.skip("cannot create a directory under /usr/share or site-packages")


def test_env_data_file_is_invisible_even_under_a_visible_prefix(
    dataset_under_a_visible_prefix, tmp_path
):
    data, neighbour = dataset_under_a_visible_prefix
    link = tmp_path / "data.jsonl"  # the env is given a symlink: the target is what is hidden
    link.symlink_to(data)
    read = (
        _read_attempts([str(data), str(neighbour)])
        + f"print('SIZE', os.stat({str(data)!r}).st_size)"
    )
    with SandboxClient(CFG) as client:
        before = client.run_python(read)
        assert GOLD in before.stdout  # the prefix is visible: only hiding keeps the answer away
        env = make_env(
            "python_math", {"data_path": str(link), "include_instructions": False}, sandbox=client
        )
        assert client.hidden_paths == (str(data),)
        assert env.reset(0) == "What is 2+2?"
        step = env.step(f"<code>\n{read}\n</code>")
        assert GOLD not in step.observation and "neighbour-visible" in step.observation, step
        assert "SIZE 0" in step.observation  # an empty file in its place
        env.close()
        assert client.restarts == 0  # the running server was replaced, not crashed


# ------------------------------------------------------------------------------- processes


def test_a_call_sees_only_its_own_processes(sandbox):
    busy = threading.Thread(target=sandbox.run_python, args=("import time; time.sleep(2)",))
    busy.start()
    time.sleep(0.5)
    code = (
        "import os, subprocess, sys\n"
        "print('PIDS', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "print('CMDLINE', open('/proc/1/cmdline', 'rb').read())\n"
        "child = 'import os; print(sorted(int(p) for p in os.listdir(\"/proc\") if p.isdigit()))'\n"
        "print('CHILD', subprocess.run([sys.executable, '-c', child], capture_output=True,"
        " text=True).stdout.strip())\n"
        # The call's memory is a copy of the server's: its options dict must be empty there.
        "found, f = [], sys._getframe()\n"
        "while f is not None:\n"
        "    for v in list(f.f_locals.values()):\n"
        "        for d in (v, getattr(v, '__dict__', None)):\n"
        "            if isinstance(d, dict):\n"
        "                found += [w for w in [d, *d.values()] if isinstance(w, dict)"
        " and 'output_kill_bytes' in w]\n"
        "    f = f.f_back\n"
        "print('OPTIONS_IN_MEMORY', len(found), sys.orig_argv)"
    )
    r = sandbox.run_python(code)
    busy.join()
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["PIDS"] == "[1]", r  # not the server, zygote, janitor, nor the busy call
    assert lines["CHILD"] == "[1, 2]", r  # its child sees it and itself
    assert "uid_base" not in lines["CMDLINE"] and "{" not in lines["CMDLINE"], r
    assert str(CFG.uid_base) not in lines["CMDLINE"]
    assert lines["OPTIONS_IN_MEMORY"].startswith("0 "), r
    assert "uid_base" not in lines["OPTIONS_IN_MEMORY"]  # nor in the original argv
    inner = [sandbox.server_info["pid"], sandbox.server_info["zygote_pid"]]
    assert all(_host_pid(pid, _tree(sandbox.server_pid or 0)) for pid in inner)  # they exist


def test_another_calls_scratch_dir_is_unreadable(sandbox):
    owner_code = (
        "import os, time\nopen('secret.txt', 'w').write('hunter2-' * 4)\n"
        "time.sleep(2)\nprint(os.getcwd(), open('secret.txt').read())"
    )
    owner: list = []
    t = threading.Thread(target=lambda: owner.append(sandbox.run_python(owner_code)))
    t.start()
    time.sleep(0.7)
    snoop = (
        "import glob, os\n"
        "root = os.path.dirname(os.getcwd())\n"
        "try:\n    print('listed', os.listdir(root))\nexcept OSError as e:\n    print('nolist')\n"
        "for n in range(1, 2000):\n"
        "    for p in (f'{root}/{n}/secret.txt', f'{root}-trash/{n}/secret.txt'):\n"
        "        try:\n            print(open(p).read())\n"
        "        except OSError:\n            pass\n"
        "for p in glob.glob('/proc/[0-9]*/cwd'):\n"
        "    try:\n        print(os.listdir(p))\n    except OSError:\n        pass\n"
        "print('done')"
    )
    r = sandbox.run_python(snoop)
    t.join()
    assert owner and "hunter2-" in owner[0].stdout  # the secret existed while we looked
    assert "hunter2" not in r.stdout and "secret.txt" not in r.stdout
    assert "nolist" in r.stdout and r.stdout.rstrip().endswith("done"), r


def test_parent_environment_does_not_leak(sandbox):
    assert os.environ["SPEAR_SANDBOX_TEST_SECRET"] == SECRET
    code = (
        "import glob, os\nprint(dict(os.environ))\n"
        "for p in glob.glob('/proc/[0-9]*/environ'):\n"
        "    try:\n        print(p, open(p, 'rb').read())\n"
        "    except OSError as e:\n        print(p, 'denied')\n"
        "for p in glob.glob('/proc/[0-9]*/cmdline'):\n"
        "    print(p, open(p, 'rb').read()[:300])"
    )
    r = sandbox.run_python(code)
    assert r.exit_code == 0 and SECRET not in r.stdout, r
    assert "SPEAR_SANDBOX_TEST_SECRET" not in r.stdout
    environs = {line.split()[0] for line in r.stdout.splitlines() if "/environ " in line}
    assert environs == {"/proc/1/environ"}, r  # the call's own: no server process to read


# -------------------------------------------------------------------------- network, escapes


def test_cannot_reach_a_tcp_server_on_the_host(sandbox):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    attempt = (
        "import socket\n"
        f"for fam, addr in ((socket.AF_INET, ('127.0.0.1', {port})), "
        f"(socket.AF_INET6, ('::1', {port}))):\n"
        "    try:\n        s = socket.socket(fam, socket.SOCK_STREAM)\n        s.settimeout(1)\n"
        "        s.connect(addr)\n        print('CONNECTED')\n"
        "    except OSError as e:\n        print('blocked', e.errno)\n"
    )
    code = (
        attempt
        + "import socket, subprocess, sys\n"
        + "for fam in (socket.AF_NETLINK, socket.AF_PACKET):\n"
        + "    try:\n        socket.socket(fam, socket.SOCK_RAW)\n        print('RAW')\n"
        + "    except OSError as e:\n        print('blocked', e.errno)\n"
        + "a, b = socket.socketpair()\na.send(b'unix ok')\nprint(b.recv(10).decode())\n"
        + f"print(subprocess.run([sys.executable, '-c', {attempt!r}], capture_output=True, "
        + "text=True).stdout)"
    )
    try:
        r = sandbox.run_python(code, timeout_s=10)
        assert "CONNECTED" not in r.stdout and "RAW" not in r.stdout, r
        assert r.stdout.count("blocked") == 6 and "unix ok" in r.stdout, r
        with pytest.raises(TimeoutError):
            server.accept()  # the server saw no connection
    finally:
        server.close()


def test_cannot_kill_the_server_or_its_parent(sandbox):
    """The server's processes are not in a call's pid namespace: it cannot reach them by their
    pids in the sandbox, by their host pids, nor with kill(-1)."""
    server_pid = sandbox.server_pid
    assert server_pid is not None
    tree = _tree(server_pid)
    info = sandbox.server_info
    targets = sorted({info["pid"], info["zygote_pid"], server_pid, *tree, *range(2, 64)})
    code = (
        "import errno, os, signal\n"
        f"for pid in {targets}:\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n        print('KILLED', pid)\n"
        "    except OSError as e:\n"
        "        print('unseen' if e.errno == errno.ESRCH else 'ERR', pid)\n"
        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
        "print('still here', os.getpid(), os.getppid())"
    )
    r = sandbox.run_python(code)
    assert "KILLED" not in r.stdout and "ERR" not in r.stdout, r
    assert r.stdout.count("unseen") == len(targets), r
    assert r.stdout.endswith("still here 1 0\n")  # the init of its own namespace
    assert sandbox.server_pid == server_pid
    assert all(Path(f"/proc/{pid}").exists() for pid in [server_pid, *tree[:3]])


def test_privileged_syscalls_are_denied(sandbox):
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "calls = {\n"
        "    'ptrace': lambda: libc.ptrace(16, 2, 0, 0),\n"  # PTRACE_ATTACH to the server
        "    'unshare_user': lambda: libc.unshare(0x10000000),\n"
        "    'unshare_net': lambda: libc.unshare(0x40000000),\n"
        "    'mount': lambda: libc.mount(b'none', b'.', b'tmpfs', 0, None),\n"
        "    'chroot': lambda: libc.chroot(b'.'),\n"
        "    'setuid0': lambda: libc.setuid(0),\n"
        f"    'bpf': lambda: libc.syscall({_BPF_NR}, 0, 0, 0),\n"
        "}\n"
        "for name, call in calls.items():\n"
        "    print(name, call(), ctypes.get_errno())\n"
        "print('uid', os.getuid(), os.getgid(), os.getgroups())\n"
        "print([l for l in open('/proc/self/status') if l.startswith(('CapEff', 'Seccomp:'))])"
    )
    r = sandbox.run_python(code)
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines())
    for name in ("ptrace", "unshare_user", "unshare_net", "mount", "chroot", "setuid0", "bpf"):
        assert lines[name].startswith("-1 "), (name, r.stdout)
    uid = int(lines["uid"].split()[0])
    assert CFG.uid_base <= uid < CFG.uid_base + CFG.max_concurrent
    assert "CapEff:\\t0000000000000000" in r.stdout and "Seccomp:\\t2" in r.stdout


# ------------------------------------------------------------------------ processes and fds


@pytest.mark.parametrize("exit_how", ["return", "os._exit"])
def test_orphan_that_outlives_the_call_is_killed(sandbox, exit_how):
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # leave the call's process group
        "    if os.fork() == 0:\n"
        "        os.close(1)\n        os.close(2)\n"  # and stop holding its pipes
        "        time.sleep(60)\n"
        "    time.sleep(60)\n"
        "time.sleep(0.3)\nprint('parent done', flush=True)\n"
    ) + ("os._exit(0)\n" if exit_how == "os._exit" else "")
    t0 = time.monotonic()
    r = sandbox.run_python(code, timeout_s=10)
    assert r.stdout == "parent done\n" and r.exit_code == 0 and not r.timed_out, r
    assert time.monotonic() - t0 < 5


def test_closing_and_replacing_fds_0_to_2(sandbox):
    code = (
        "import os, sys\n"
        "os.close(0)\nos.close(1)\nos.close(2)\n"
        "fd = os.open('/dev/null', os.O_WRONLY)\n"
        "os.dup2(os.open('/etc/hostname', os.O_RDONLY), 2)\n"
        "print('lost')\n"
    )
    r = sandbox.run_python(code)
    assert r.stdout == "" and not r.timed_out and r.infra_error is None, r
    r = sandbox.run_python("import os\nos.dup2(os.open('out.txt', os.O_WRONLY | os.O_CREAT), 1)\n"
                           "os.write(1, b'to file')\nos.write(2, b'still stderr')")  # fmt: skip
    assert r.stdout == "" and r.stderr == "still stderr" and r.exit_code == 0
