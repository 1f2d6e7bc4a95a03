"""Start and stop a real SGLang prefill-decode deployment on 127.0.0.1 for tests.

One :class:`PDDeployment` = a prefill server, a decode server (both
``python -m sglang.launch_server``) and the router (``sglang_router.launch_router
--pd-disaggregation``), each a process in its own session/process group with
its log file under ``log_dir``. Every port (HTTP, bootstrap, router, router
metrics) is a free one, so several deployments may run side by side.

    with PDDeployment(model_path, backend="spectrum") as d:
        print(d.generate("Hello", max_new_tokens=8)["text"])

``stop()`` (also on ``__exit__``, on a failed ``start()`` and from the pytest
finalizer in :func:`start_deployment`) terminates each process group by PID:
SIGTERM, then SIGKILL after a grace period. A failed start raises
:class:`DeploymentError` whose message holds the tail of every log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1", "MC_FORCE_TCP": "1"}
SERVER_FLAGS = ["--device", "cpu", "--host", "127.0.0.1", "--max-total-tokens", "16384"]
HOST = "127.0.0.1"
_handed_out: set[int] = set()


class DeploymentError(RuntimeError):
    """A server did not come up (message includes the tail of the logs)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now and not handed out before by this process."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text[-lines:])


@dataclass(eq=False)
class ManagedProcess:
    """A child process in its own process group, logging to one file."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,  # own process group: killpg reaches its children
            )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def group_members(self) -> list[int]:
        """PIDs of live (non-zombie) processes in this process group."""
        if self.popen is None:
            return []
        pgid = self.popen.pid  # == pgid because of start_new_session
        members = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                    members.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        return members

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s``; returns exit code."""
        if self.popen is None:
            return None
        pgid = self.popen.pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if not self.group_members():
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.popen.poll()  # reap the leader
                if not self.group_members():
                    break
                time.sleep(0.2)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return self.popen.returncode

    def tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)


@dataclass(eq=False)
class PDDeployment:
    """Prefill + decode + router for one model and one transfer backend."""

    model_path: str | os.PathLike[str]
    backend: str = "mooncake"
    decode_backend: str | None = None  # default: same as ``backend``
    prefill_args: Sequence[str] = ()
    decode_args: Sequence[str] = ()
    prefill_env: Mapping[str, str] = field(default_factory=dict)
    decode_env: Mapping[str, str] = field(default_factory=dict)
    log_dir: str | os.PathLike[str] | None = None
    startup_timeout_s: float = 300.0
    mini_lb: bool = False
    python: str = sys.executable
    procs: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix=f"pd-{self.backend}-"))
        self.prefill_port = free_port()
        self.decode_port = free_port()
        self.bootstrap_port = free_port()
        self.router_port = free_port()
        self.router_metrics_port = free_port()

    # ------------------------------------------------------------------ urls

    @property
    def prefill_url(self) -> str:
        return f"http://{HOST}:{self.prefill_port}"

    @property
    def decode_url(self) -> str:
        return f"http://{HOST}:{self.decode_port}"

    @property
    def router_url(self) -> str:
        return f"http://{HOST}:{self.router_port}"

    # ------------------------------------------------------------------ lifecycle

    def _env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(CPU_ENV)
        env.update(extra)
        return env

    def _server_cmd(self, mode: str, port: int, extra: Sequence[str]) -> list[str]:
        backend = self.decode_backend if mode == "decode" and self.decode_backend else self.backend
        return [
            self.python, "-m", "sglang.launch_server",
            "--model-path", str(self.model_path),
            "--port", str(port),
            *SERVER_FLAGS,
            "--disaggregation-mode", mode,
            "--disaggregation-transfer-backend", backend,
            "--disaggregation-bootstrap-port", str(self.bootstrap_port),
            *extra,
        ]  # fmt: skip

    def start(self) -> PDDeployment:
        t0 = time.monotonic()
        try:
            prefill = ManagedProcess(
                "prefill",
                self._server_cmd("prefill", self.prefill_port, self.prefill_args),
                Path(self.log_dir, "prefill.log"),
                self._env(self.prefill_env),
            )
            decode = ManagedProcess(
                "decode",
                self._server_cmd("decode", self.decode_port, self.decode_args),
                Path(self.log_dir, "decode.log"),
                self._env(self.decode_env),
            )
            for p in (prefill, decode):
                self.procs.append(p)
                p.start()
            self._wait_healthy([(prefill, self.prefill_url), (decode, self.decode_url)], t0)
            router_cmd = [
                self.python, "-m", "sglang_router.launch_router", "--pd-disaggregation",
                "--prefill", self.prefill_url, str(self.bootstrap_port),
                "--decode", self.decode_url,
                "--host", HOST, "--port", str(self.router_port),
                "--prometheus-host", HOST, "--prometheus-port", str(self.router_metrics_port),
            ] + (["--mini-lb"] if self.mini_lb else [])  # fmt: skip
            router = ManagedProcess(
                "router", router_cmd, Path(self.log_dir, "router.log"), self._env({})
            )
            self.procs.append(router)
            router.start()
            self._wait_healthy(
                [(router, self.router_url)], time.monotonic(), 120, self._router_ready
            )
        except BaseException as e:
            report = self.report(f"PD deployment ({self.backend}) failed to start: {e}")
            self.stop()
            print(report, file=sys.stderr)
            if isinstance(e, DeploymentError):
                raise DeploymentError(report) from None
            raise
        self.startup_s = time.monotonic() - t0
        return self

    @staticmethod
    def _server_ready(url: str) -> bool:
        return requests.get(f"{url}/health", timeout=5).status_code == 200

    @staticmethod
    def _router_ready(url: str) -> bool:
        # /health answers before the workers are registered; /readiness waits for them
        if requests.get(f"{url}/readiness", timeout=5).status_code != 200:
            return False
        stats = requests.get(f"{url}/workers", timeout=5).json().get("stats", {})
        return stats.get("prefill_count", 0) >= 1 and stats.get("decode_count", 0) >= 1

    def _wait_healthy(
        self,
        targets: list[tuple[ManagedProcess, str]],
        t0: float,
        timeout_s: float | None = None,
        ready: Any = None,
    ) -> None:
        timeout_s = timeout_s or self.startup_timeout_s
        ready = ready or self._server_ready
        deadline = t0 + timeout_s
        pending = dict(targets)
        while pending:
            for proc, url in list(pending.items()):
                if not proc.alive():
                    raise DeploymentError(
                        f"{proc.name} exited with code {proc.popen.returncode} during startup"
                    )
                try:
                    if ready(url):
                        del pending[proc]
                except (requests.RequestException, ValueError):
                    pass
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise DeploymentError(f"{names} not ready after {timeout_s:.0f} s")
            time.sleep(1.0)

    def stop(self) -> None:
        """Stop router, decode, prefill (each process group by PID); idempotent."""
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as e:  # keep stopping the others
                print(f"pd_harness: stopping {proc.name} failed: {e}", file=sys.stderr)

    def report(self, title: str, lines: int = 60) -> str:
        parts = [title, f"logs: {self.log_dir}"]
        for p in self.procs:
            parts.append(f"----- {p.name} (pid {p.pid}) {p.log_path} -----\n{p.tail(lines)}")
        return "\n".join(parts)

    def __enter__(self) -> PDDeployment:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests

    def generate(
        self, text: str, max_new_tokens: int = 16, timeout_s: float = 180.0, **sampling: Any
    ) -> dict[str, Any]:
        """Greedy ``/generate`` through the router; raises on HTTP errors (with the body)."""
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, **sampling}
        r = requests.post(
            f"{self.router_url}/generate",
            json={"text": text, "sampling_params": params},
            timeout=timeout_s,
        )
        if r.status_code != 200:
            raise requests.HTTPError(f"/generate -> {r.status_code}: {r.text}", response=r)
        return r.json()

    def chat(self, content: str, max_tokens: int = 32, timeout_s: float = 180.0, **kw: Any) -> str:
        """Greedy ``/v1/chat/completions`` through the router; returns the message text."""
        r = requests.post(
            f"{self.router_url}/v1/chat/completions",
            json={
                "model": "default",
                "messages": [{"role": "user", "content": content}],
                "temperature": 0.0,
                "max_tokens": max_tokens,
                **kw,
            },
            timeout=timeout_s,
        )
        if r.status_code != 200:
            raise requests.HTTPError(f"chat -> {r.status_code}: {r.text}", response=r)
        return r.json()["choices"][0]["message"]["content"]


def start_deployment(request: Any, **kwargs: Any) -> PDDeployment:
    """Pytest helper: start a deployment whose stop() is registered as a finalizer first."""
    d = PDDeployment(**kwargs)
    request.addfinalizer(d.stop)
    return d.start()
