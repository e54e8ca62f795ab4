"""Sandbox throughput: the fork-server vs. a fresh `python -c` per call, under the same limits.

    .venv/bin/python benchmarks/sandbox.py [--calls 400] [--concurrency 1,2]

For each concurrency level (threads sharing one SandboxClient / calling subprocess.run), prints
exec/s and p50/p99 latency of short snippets for both, and their ratio. Because a shared machine
distorts wall-clock numbers, it also prints the CPU time each exec cost (client + the whole
sandbox process tree, or client + the `python -c` children) and how many cores other processes
kept busy meanwhile. First it prints the start-up cost of the sandbox's mounts: bwrap running
/bin/true with the allow list (system dirs, a few files of /etc, the interpreter) against the
former layout (the whole host read-only, a deny list of dirs hidden), alternating, with the
same namespaces. The last line is JSON: `sandbox_exec_s`, `subprocess_exec_s`, `speedup`,
`sandbox_p99_ms` at the highest concurrency, the CPU figures, `server_start_s` and the two
bwrap start-up medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from spear_ray.sandbox import SandboxClient, SandboxConfig
from spear_ray.sandbox.client import _interpreter_paths, _project_root, _under

SNIPPETS = (
    ("print(sum(i * i for i in range(1000)))", "332833500\n"),
    ("import math\nprint(math.factorial(20))", "2432902008176640000\n"),
    ("xs = sorted([3, 1, 2])\nprint(xs)", "[1, 2, 3]\n"),
    ("print('hello')", "hello\n"),
)


def _limits(cfg: SandboxConfig) -> Callable[[], None]:
    """The sandbox's rlimits, applied to each subprocess before exec (the 'same limits')."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cfg.cpu_seconds, cfg.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (cfg.memory_mb * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (cfg.max_open_files,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (cfg.max_file_size_mb * 2**20,) * 2)
        os.setsid()

    return apply


def _subprocess_call(cfg: SandboxConfig) -> Callable[[str], str]:
    python = cfg.python or sys.executable
    preexec = _limits(cfg)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

    def call(code: str) -> str:
        proc = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=cfg.timeout_s,
            env=env,
            preexec_fn=preexec,
        )
        return proc.stdout

    return call


# ------------------------------------------------------------------- start-up of the mounts

# The former layout hid these dirs of a read-only view of the whole host.
_OLD_HIDDEN = ("/home", "/root", "/work", "/run", "/mnt", "/media", "/srv")


def _old_filesystem_args(cfg: SandboxConfig, python: str) -> list[str]:
    """The mounts before the allow list: / read-only, a tmpfs over each hidden dir (and the
    project), the interpreter's dirs under them bound again."""
    hidden = [p for p in _OLD_HIDDEN if os.path.isdir(p)]
    project = _project_root()
    if project is not None and not any(_under(project, h) for h in hidden):
        hidden.append(project)
    masked = ["/tmp", "/dev/shm", *hidden]
    prefixes, sys_path = _interpreter_paths(python)
    tmp = str(cfg.tmp_size_mb * 2**20)
    args = ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    args += ["--perms", "0755", "--size", tmp, "--tmpfs", "/tmp"]
    args += ["--perms", "1777", "--size", tmp, "--tmpfs", "/dev/shm"]
    for p in hidden:
        args += ["--tmpfs", p]
    exposed: list[str] = []
    for p in sorted({*prefixes, *sys_path}, key=len):
        if not any(_under(p, h) for h in masked) or any(_under(p, q) for q in exposed):
            continue
        if project is not None and _under(p, project) and not any(_under(p, q) for q in prefixes):
            continue
        exposed.append(p)
        args += ["--ro-bind", p, p]
    return args


def _bwrap_start_ms(client: SandboxClient, old: bool) -> float:
    """Milliseconds for bwrap to set up the sandbox's mounts and namespaces and run /bin/true."""
    launch = client._command()
    argv = launch.argv[: launch.argv.index("--")]
    if old:  # swap the allow-list mounts for the former ones; namespaces and caps unchanged
        first_ns = argv.index("--unshare-pid")
        python = launch.argv[launch.argv.index("--") + 1]
        argv = [argv[0], *_old_filesystem_args(client.config, python), *argv[first_ns:]]
    try:
        t0 = time.perf_counter()
        subprocess.run([*argv, "--", "/bin/true"], check=True, pass_fds=launch.fds)
        return 1000 * (time.perf_counter() - t0)
    finally:
        for fd in launch.fds:
            os.close(fd)


def _mount_startup(cfg: SandboxConfig, runs: int) -> tuple[float, float]:
    """Median bwrap start-up (ms) with the allow list and with the former layout, alternated
    so that a busy neighbour slows both alike."""
    new_ms, old_ms = [], []
    with SandboxClient(cfg) as client:
        for _ in range(runs):
            new_ms.append(_bwrap_start_ms(client, old=False))
            old_ms.append(_bwrap_start_ms(client, old=True))
    return statistics.median(new_ms), statistics.median(old_ms)


# ------------------------------------------------------------------- calls

_HZ = os.sysconf("SC_CLK_TCK")


def _busy_jiffies() -> int:
    """Jiffies all CPUs spent not idle, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def _tree_cpu_s(root: int | None) -> float:
    """CPU seconds of a process tree's long-lived members, including the children they reaped."""
    if root is None:
        return 0.0
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return total / _HZ


def _measure(
    call: Callable[[str], str], calls: int, concurrency: int, cpu: Callable[[], float]
) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(n: int, offset: int) -> None:
        for i in range(n):
            code, want = SNIPPETS[(offset + i) % len(SNIPPETS)]
            t0 = time.perf_counter()
            got = call(code)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if got != want:
                    errors.append(f"{code!r}: {got!r}")

    per_thread = calls // concurrency
    threads = [threading.Thread(target=worker, args=(per_thread, k)) for k in range(concurrency)]
    cpu0, busy0 = cpu(), _busy_jiffies()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    used_s, busy_s = cpu() - cpu0, (_busy_jiffies() - busy0) / _HZ
    if errors:
        raise RuntimeError(f"{len(errors)} wrong outputs, e.g. {errors[0]}")
    latencies.sort()
    return {
        "exec_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "cpu_ms": 1000 * used_s / len(latencies),
        "others_cores": max(0.0, busy_s - used_s) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per measurement")
    parser.add_argument("--concurrency", default="1,2", help="comma-separated client counts")
    parser.add_argument("--isolation", default="bwrap", choices=("bwrap", "none"))
    parser.add_argument("--preload", default=None, help="comma-separated modules to pre-import")
    parser.add_argument("--warm", type=int, default=None, help="sandbox.warm_children")
    parser.add_argument("--startups", type=int, default=30, help="bwrap start-ups per layout")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    overrides: dict = {"isolation": args.isolation}
    if args.preload is not None:
        overrides["preload_modules"] = tuple(m for m in args.preload.split(",") if m)
    if args.warm is not None:
        overrides["warm_children"] = args.warm
    cfg = SandboxConfig(**overrides)
    sub = _subprocess_call(cfg)

    print(f"cpus={os.cpu_count()} calls={args.calls} isolation={cfg.isolation} "
          f"preload={list(cfg.preload_modules)} warm_children={cfg.warm_children} "
          f"python={cfg.python or sys.executable}")  # fmt: skip
    rows = {}
    start_ms = old_start_ms = 0.0
    if cfg.isolation == "bwrap":
        start_ms, old_start_ms = _mount_startup(cfg, args.startups)
        print(f"bwrap start-up (median of {args.startups}): allow list {start_ms:.1f} ms, "
              f"whole host with hidden dirs {old_start_ms:.1f} ms, ratio "
              f"{start_ms / old_start_ms:.2f}x")  # fmt: skip
    with SandboxClient(cfg) as sandbox:
        t0 = time.perf_counter()
        sandbox.start()
        server_start_s = time.perf_counter() - t0
        print(f"server start {server_start_s:.2f}s: {sandbox.server_info}")

        def sb(code: str) -> str:
            result = sandbox.run_python(code)
            if not result.ok:
                raise RuntimeError(f"sandbox call failed: {result}")
            return result.stdout

        for code, _ in SNIPPETS * 5:  # warm up both paths
            sb(code)
            sub(code)

        def sb_cpu() -> float:
            return time.process_time() + _tree_cpu_s(sandbox.server_pid)

        def sub_cpu() -> float:
            return time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime + \
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime  # fmt: skip

        print(f"{'clients':>7} {'':10} {'exec/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'cpu ms/exec':>11} {'others busy':>11}")  # fmt: skip
        for c in levels:
            s = _measure(sb, args.calls, c, sb_cpu)
            p = _measure(sub, max(args.calls // 4, 4 * c), c, sub_cpu)
            rows[c] = (s, p)
            for name, r in (("sandbox", s), ("subprocess", p)):
                print(f"{c:>7} {name:10} {r['exec_s']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                      f"{r['cpu_ms']:11.2f} {r['others_cores']:8.2f} cores")  # fmt: skip
            print(f"{c:>7} {'speedup':10} {s['exec_s'] / p['exec_s']:8.2f}x   cpu per exec: "
                  f"{p['cpu_ms'] / s['cpu_ms']:.2f}x less")  # fmt: skip
    s, p = rows[max(levels)]
    print(
        json.dumps(
            {
                "sandbox_exec_s": round(s["exec_s"], 1),
                "subprocess_exec_s": round(p["exec_s"], 1),
                "speedup": round(s["exec_s"] / p["exec_s"], 2),
                "sandbox_p99_ms": round(s["p99_ms"], 2),
                "clients": max(levels),
                "sandbox_p50_ms": round(s["p50_ms"], 2),
                "subprocess_p50_ms": round(p["p50_ms"], 2),
                "sandbox_cpu_ms_per_exec": round(s["cpu_ms"], 2),
                "subprocess_cpu_ms_per_exec": round(p["cpu_ms"], 2),
                "others_busy_cores": round(s["others_cores"], 2),
                "server_start_s": round(server_start_s, 2),
                "bwrap_start_ms": round(start_ms, 1),
                "bwrap_start_old_layout_ms": round(old_start_ms, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
