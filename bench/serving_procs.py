"""Child processes of bench/serving_gpu.py: servers and proxies in their own process
groups (logs per process), stopped all at once; readiness polling and a small HTTP
client. (Same shape as sglang_spectrum.sglang_plugin.launch.ManagedProcess, kept
here so that the GPU harness needs nothing but the standard library.)"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class Proc:
    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log_path, "ab")
        fh.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(self.cmd)}\n".encode())
        fh.flush()
        self.popen = subprocess.Popen(
            self.cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.log_path.parent,
            start_new_session=True,
        )
        fh.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> bool:
        """Signal the process group; False once the group is gone."""
        if self.popen is None:
            return False
        self.popen.poll()  # reap the leader
        try:
            os.killpg(self.popen.pid, sig)  # its own session: pgid == pid
            return True
        except ProcessLookupError:
            return False

    def stop(self, grace_s: float = 10.0) -> None:
        stop_all([self], grace_s)

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        lines = [ln for ln in lines if "GET /health" not in ln]
        return "\n".join(lines[-n:])


def stop_all(procs: list[Proc], grace_s: float = 10.0) -> None:
    """SIGTERM every process group at once, SIGKILL what is left after ``grace_s``."""
    live = [p for p in procs if p.signal(signal.SIGTERM)]
    t = time.monotonic()
    while live and time.monotonic() - t < grace_s:
        time.sleep(0.25)
        live = [p for p in live if p.signal(0)]
    for p in live:
        p.signal(signal.SIGKILL)
    t = time.monotonic()
    while live and time.monotonic() - t < 5:
        time.sleep(0.25)
        live = [p for p in live if p.signal(0)]


def http(url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, repr(e).encode()


def wait_ready(targets: list[tuple[Proc, str]], timeout_s: float) -> None:
    """Wait until every URL answers 200; raise with the log tail of a dead or slow one."""
    t0 = time.monotonic()
    pending = list(targets)
    while pending:
        for p, url in list(pending):
            if not p.alive():
                raise RuntimeError(f"{p.name} exited (rc {p.popen.returncode}):\n{p.tail()}")
            if http(url, timeout=3)[0] == 200:
                pending.remove((p, url))
        if pending and time.monotonic() - t0 > timeout_s:
            names = ", ".join(p.name for p, _ in pending)
            raise RuntimeError(
                f"not ready after {timeout_s:.0f} s: {names}\n{pending[0][0].tail()}"
            )
        if pending:
            time.sleep(1.0)
