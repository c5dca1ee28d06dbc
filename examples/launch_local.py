#!/usr/bin/env python
"""Runs a multi-process (multi-host style) JAX job on this one machine: a rehearsal for a pod.

    python examples/launch_local.py --processes 2 -- --fake-cpu-devices 4 --mesh 2,2,2 --steps 20

starts `--processes` copies of examples/train_tpu.py (or `--script`), each with `--coordinator
127.0.0.1:<free port> --num-processes N --process-id i` added to the arguments after `--`, prints their
output prefixed with the process id, and waits. JAX's multi-controller model is then exactly a pod's:
one process per "host", each owning its own (here fake CPU) devices, collectives between processes
(gloo on CPU). If one process fails or the run passes `--timeout` seconds, the others are stopped and
the launcher exits non-zero, so nothing is left hanging.
"""

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port that was free a moment ago (the coordinator binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, sink, lines: list[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.append(line)
        if sink is not None:
            sink.write(f"{prefix}{line}")
            sink.flush()


def launch(
    script, args, *, processes: int, timeout: float = 600.0, echo=sys.stdout, env=None
) -> tuple[int, list[str]]:
    """Runs `processes` copies of `script args --coordinator ... --process-id i`; returns
    (exit code: 0 when every process succeeded, else the first failure's code or 124 on timeout,
    each process's whole output). Stops every process when one fails or time runs out."""
    if processes < 1:
        raise ValueError(f"{processes=} must be >= 1")
    port = free_port()
    env = dict(os.environ if env is None else env)
    # Small machines: the CPU client's thread pool must cover the fake devices that wait on each other.
    env.setdefault("PJRT_NPROC", "16")
    env["PYTHONUNBUFFERED"] = "1"
    procs, outputs, pumps = [], [], []
    for i in range(processes):
        cmd = [sys.executable, str(script), *args, "--coordinator", f"127.0.0.1:{port}"]
        cmd += ["--num-processes", str(processes), "--process-id", str(i)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        lines: list[str] = []
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] ", echo, lines), daemon=True)
        pump.start()
        procs.append(proc)
        outputs.append(lines)
        pumps.append(pump)

    deadline = time.monotonic() + timeout
    code = 0
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            code = failed[0]
            break
        if all(c == 0 for c in codes):
            break
        if time.monotonic() > deadline:
            code = 124
            break
        time.sleep(0.1)
    for p in procs:  # a failed or timed-out run: stop the rest (their peers would wait forever)
        if p.poll() is None:
            p.kill()
    for p, pump in zip(procs, pumps, strict=True):
        p.wait()
        pump.join(timeout=5)
    return code, ["".join(lines) for lines in outputs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--script", default=str(HERE / "train_tpu.py"), help="default: train_tpu.py")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds, then all are stopped")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the script's own arguments")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    code, _ = launch(ns.script, args, processes=ns.processes, timeout=ns.timeout)
    if code:
        print(f"launch_local: a process failed (exit code {code}); the others were stopped", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
