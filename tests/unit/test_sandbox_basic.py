"""The sandbox runs code like `python -c`, in parallel, and survives its own server dying.

These use the real sandbox (bubblewrap + seccomp + per-call uid): one server per module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from spear_ray.sandbox import ExecResult, SandboxClient, SandboxConfig, SandboxUnavailableError
from spear_ray.sandbox.client import _mount_plan

pytestmark = pytest.mark.sandbox  # skipped without bubblewrap and root

CFG = SandboxConfig(
    timeout_s=10,
    memory_mb=512,
    max_file_size_mb=8,
    max_processes=32,
    max_concurrent=8,
    output_kill_bytes=4 * 2**20,
    preload_modules=("math",),
    tmp_size_mb=256,
)


@pytest.fixture(scope="module")
def sandbox():
    with SandboxClient(CFG) as client:
        client.start()
        yield client


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


# ------------------------------------------------------------------------------------- config


def test_config_fields_have_defaults_and_descriptions():
    cfg = SandboxConfig()
    assert cfg.isolation == "bwrap" and cfg.timeout_s == 30
    for name, field in SandboxConfig.model_fields.items():
        assert field.description, name
        assert "\n" not in field.description, name
    with pytest.raises(Exception, match="frozen"):
        cfg.timeout_s = 5  # type: ignore[misc]
    with pytest.raises(Exception, match="extra"):
        SandboxConfig(no_such_field=1)  # type: ignore[call-arg]
    with pytest.raises(Exception, match="isolation"):
        SandboxConfig(isolation="docker")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="warm_children"):
        SandboxConfig(warm_children=4, max_concurrent=2)


def test_old_hide_paths_still_load_and_paths_must_be_absolute():
    old = ("/home", "/root", "/work", "/run", "/mnt", "/media", "/srv")  # the former default
    assert SandboxConfig(hide_paths=old).hide_paths == old  # a deny list on top of the allow list
    assert SandboxConfig().hide_paths == () and SandboxConfig().expose_paths == ()
    with pytest.raises(Exception, match=r"sandbox\.expose_paths: 'data' is not an absolute path"):
        SandboxConfig(expose_paths=("data",))


def test_mount_plan_allows_few_paths_and_masks_data_last():
    layers = _mount_plan(
        system=["/usr", "/etc/ld.so.cache"],
        binds=["/opt/py", "/usr/local/lib/py", "/srv/venv"],
        deny=["/usr/local", "/home", "/srv"],
        data=["/opt/py/lib/data.jsonl", "/data/train.jsonl", "/usr/share/math"],
    )
    assert layers == [
        ("bind", "/usr"),
        ("bind", "/etc/ld.so.cache"),
        ("bind", "/opt/py"),
        ("bind", "/srv/venv"),
        ("mask", "/usr/local"),  # under a visible dir: masked; /home and /srv were never there
        ("bind", "/usr/local/lib/py"),  # the interpreter's path under it comes back
        ("mask", "/opt/py/lib/data.jsonl"),  # data: masked even in the interpreter's prefix
        ("mask", "/usr/share/math"),  # (/data was never mounted)
    ]


def test_hidden_path_holding_the_interpreter_refuses_with_one_line_reason():
    with SandboxClient(CFG) as client:
        client.hide(os.path.dirname(sys.prefix))
        with pytest.raises(SandboxUnavailableError) as err:
            client.start()
    assert "\n" not in str(err.value) and "holds the interpreter's" in str(err.value)


# -------------------------------------------------------------------------------- behaviour


def test_runs_like_python_dash_c(sandbox):
    r = sandbox.run_python("import math\nprint(math.factorial(10))")
    assert r == ExecResult(stdout="3628800\n", stderr="", exit_code=0, timed_out=False,
                           wall_s=r.wall_s)  # fmt: skip
    assert r.ok and 0 < r.wall_s < 5
    assert sandbox.server_info["uid_isolation"] and sandbox.server_info["seccomp"]


def test_errors_exit_codes_and_tracebacks(sandbox):
    r = sandbox.run_python("x = 1\nprint('before')\n1 / x0")
    assert r.exit_code == 1 and r.stdout == "before\n" and not r.ok
    assert 'File "<string>", line 3' in r.stderr and "NameError" in r.stderr
    assert "_run_user_code" not in r.stderr  # the server's own frames are hidden
    r = sandbox.run_python("def f(:\n  pass")
    assert r.exit_code == 1 and "SyntaxError" in r.stderr
    assert sandbox.run_python("import sys; sys.exit(3)").exit_code == 3
    assert sandbox.run_python("raise SystemExit('bye')").stderr == "bye\n"
    r = sandbox.run_python("import sys; print('e', file=sys.stderr); raise KeyboardInterrupt")
    assert r.stderr.startswith("e\n") and "KeyboardInterrupt" in r.stderr and r.exit_code == 1
    assert r.infra_error is None


def test_unicode_binary_and_unflushed_output(sandbox):
    code = "import sys\nprint('π ≈ 3.14', end='', flush=True)\nsys.stdout.buffer.write(b'\\xff')"
    r = sandbox.run_python(code)
    assert r.stdout == "π ≈ 3.14\ufffd" and r.exit_code == 0
    code = "import atexit, threading, time\natexit.register(print, 'atexit ran')\n"
    code += "threading.Thread(target=lambda: (time.sleep(0.2), print('thread ran'))).start()"
    assert sandbox.run_python(code).stdout == "thread ran\natexit ran\n"


def test_output_cap_sets_truncated(sandbox):
    cap = CFG.max_output_bytes
    r = sandbox.run_python(f"import sys\nsys.stdout.write('a' * {cap + 10})\nsys.stderr.write('b')")
    assert r.stdout == "a" * cap and r.stdout_truncated
    assert r.stderr == "b" and not r.stderr_truncated and r.exit_code == 0
    r = sandbox.run_python(f"print('a' * {cap - 1})")
    assert len(r.stdout) == cap and not r.stdout_truncated


def test_scratch_dir_is_private_fresh_and_importable(sandbox):
    code = (
        "import os, stat\n"
        "open('helper.py', 'w').write('X = 41')\n"
        "import helper\n"
        "print(helper.X + 1, os.listdir('.'), oct(stat.S_IMODE(os.stat('.').st_mode)))\n"
        "print(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])"
    )
    r = sandbox.run_python(code)
    assert r.stdout == "42 ['helper.py'] 0o700\nTrue\n", r
    r = sandbox.run_python("import os; print(os.listdir('.'))")
    assert r.stdout == "[]\n"  # the previous call's dir is gone


def test_environment_is_clean(sandbox):
    r = sandbox.run_python("import os, sys; print(sorted(os.environ)); print(sys.argv)")
    names = eval(r.stdout.splitlines()[0])
    assert set(names) <= {"PATH", "LANG", "LC_ALL", "PYTHONIOENCODING", "PYTHONDONTWRITEBYTECODE",
                          "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "USER",
                          "LOGNAME", "HOME", "TMPDIR"}  # fmt: skip
    assert r.stdout.splitlines()[1] == "['-c']"


def test_multiprocessing_and_subprocess_work(sandbox):
    code = (
        "import multiprocessing as mp, subprocess, sys\n"
        "def sq(x):\n    return x * x\n"
        "if __name__ == '__main__':\n"
        "    with mp.Pool(2) as pool:\n        print(pool.map(sq, range(5)))\n"
        "    print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True,"
        " text=True).stdout.strip())"
    )
    r = sandbox.run_python(code, timeout_s=20)
    assert r.stdout == "[0, 1, 4, 9, 16]\n7\n", r


def test_per_call_timeout_overrides_config(sandbox):
    r = sandbox.run_python("import time; time.sleep(5)", timeout_s=0.5)
    assert r.timed_out and r.exit_code == -signal.SIGKILL and r.infra_error is None
    assert r.wall_s < 4
    with pytest.raises(ValueError):
        sandbox.run_python("pass", timeout_s=0)


def test_calls_from_many_threads_run_in_parallel(sandbox):
    n = 6
    codes = [f"import time; time.sleep(1); print({i})" for i in range(n)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(sandbox.run_python, codes))
    elapsed = time.monotonic() - t0
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(n)]
    assert elapsed < n * 1.0 / 2  # serialized would take n seconds


def test_more_calls_than_slots_queue_and_all_finish(sandbox):
    n = CFG.max_concurrent * 3
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(sandbox.run_python, [f"print({i} * 2)" for i in range(n)]))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(n)]


def test_async_calls_do_not_block_the_loop(sandbox):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        codes = [f"import time; time.sleep(0.5); print({i})" for i in range(4)]
        results = await asyncio.gather(*(sandbox.arun_python(c) for c in codes))
        task.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert ticks >= 3  # the loop kept running while the calls were out


def test_closed_client_refuses_calls():
    client = SandboxClient(CFG)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.run_python("print(1)")


# --------------------------------------------------------------------------- server failures


@pytest.mark.parametrize("victim", ["bwrap", "server"])
def test_server_killed_midcall_gives_infra_error_then_restarts(victim):
    with SandboxClient(CFG) as client:
        client.start()
        first = client.server_pid
        assert first is not None
        result: list[ExecResult] = []
        t = threading.Thread(
            target=lambda: result.append(client.run_python("import time; time.sleep(30)"))
        )
        t.start()
        time.sleep(0.5)
        # bwrap itself, or the Python server inside it (bwrap -> bwrap's init -> server)
        pid = first if victim == "bwrap" else _descendants(first)[1]
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=10)
        assert result and result[0].infra_error and not result[0].ok
        assert result[0].exit_code is None and not result[0].timed_out
        after = client.run_python("print('back')")
        assert after.stdout == "back\n" and after.ok
        assert client.restarts == 1 and client.server_pid != first


def test_hung_server_counts_as_infra_error_and_is_replaced():
    cfg = CFG.model_copy(update={"reply_grace_s": 1.0})
    with SandboxClient(cfg) as client:
        client.start()
        first = client.server_pid
        inner = _descendants(first)[1]
        os.kill(inner, signal.SIGSTOP)
        try:
            r = client.run_python("print(1)", timeout_s=0.5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(inner, signal.SIGCONT)
        assert r.infra_error and "no reply" in r.infra_error
        assert client.run_python("print(2)").stdout == "2\n" and client.restarts == 1


# ------------------------------------------------------------------------------ refusing to run


def test_missing_bwrap_refuses_with_one_line_install_hint():
    client = SandboxClient(CFG.model_copy(update={"bwrap_path": "/nonexistent/bwrap"}))
    with pytest.raises(SandboxUnavailableError) as err:
        client.start()
    msg = str(err.value)
    assert "\n" not in msg and "bubblewrap" in msg and "apt-get install -y bubblewrap" in msg
    with pytest.raises(SandboxUnavailableError):
        client.run_python("print(1)")
    client.close()


def test_bwrap_that_cannot_start_refuses_with_one_line_reason():
    client = SandboxClient(CFG.model_copy(update={"bwrap_path": "/bin/false"}))
    with pytest.raises(SandboxUnavailableError) as err:
        client.start()
    assert "\n" not in str(err.value) and "failed to start" in str(err.value)
    client.close()


def test_cancelled_async_call_does_not_break_the_client(sandbox):
    async def main():
        task = asyncio.create_task(sandbox.arun_python("import time; time.sleep(0.5)"))
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.6)  # its reply arrives for nobody
        return await sandbox.arun_python("print('fine')")

    assert asyncio.run(main()).stdout == "fine\n"
    assert sandbox.restarts == 0


def test_missing_seccomp_refuses_with_one_line_install_hint():
    base = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([str(base), "-E", "-s", "-c", "import pyseccomp"], capture_output=True)
    if not base.exists() or probe.returncode == 0:
        pytest.skip("no interpreter without pyseccomp to simulate its absence")
    client = SandboxClient(CFG.model_copy(update={"python": str(base)}))
    with pytest.raises(SandboxUnavailableError) as err:
        client.start()
    msg = str(err.value)
    assert "\n" not in msg and "seccomp" in msg and "pip install pyseccomp" in msg
    client.close()


def test_isolation_none_warns_on_every_start(caplog):
    caplog.set_level(logging.WARNING, logger="spear_ray.sandbox.client")
    with SandboxClient(CFG.model_copy(update={"isolation": "none"})) as client:
        assert client.run_python("print(5)").stdout == "5\n"
        assert not client.server_info["seccomp"] and not client.server_info["uid_isolation"]
        assert sum("isolation=none" in r.message for r in caplog.records) == 1
        os.kill(client.server_pid, signal.SIGKILL)
        time.sleep(0.2)
        client.run_python("print(1)")  # whether or not this one noticed, the next one restarts
        assert client.run_python("print(6)").stdout == "6\n"
        assert sum("isolation=none" in r.message for r in caplog.records) == 2
