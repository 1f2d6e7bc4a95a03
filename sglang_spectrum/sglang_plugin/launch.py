"""Start and stop a real SGLang prefill-decode deployment on 127.0.0.1.

Shared by ``spectrumkv demo`` (:mod:`.demo`), the end-to-end tests
(``tests/pd_harness.py``) and the serving benchmark (``bench/serving.py``).

One :class:`PDDeployment` = a prefill server, a decode server (both
``python -m sglang.launch_server``) and the router (``sglang_router.launch_router
--pd-disaggregation``), each a process in its own session/process group with
its log file under ``log_dir``. Every port (HTTP, bootstrap, router, router
metrics) is a free one, so several deployments may run side by side.

    with PDDeployment(model_path, backend="spectrum") as d:
        print(d.generate("Hello", max_new_tokens=8)["text"])

``stop()`` (also on ``__exit__`` and on a failed ``start()``) terminates each
process group by PID: SIGTERM, then SIGKILL after a grace period. A failed
start raises :class:`DeploymentError` whose message holds the tail of every log.
With ``stats=True`` both servers append per-request SpectrumKV records to
``log_dir/spectrum_stats.jsonl`` (see :mod:`.metrics`).
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from .compat import cpu_server_env, cpu_server_flags

CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "OMP_NUM_THREADS": "1",
    "MC_FORCE_TCP": "1",
    # SGLang's tokenizer manager sleeps 5 s on every stop whose SIGTERM reached its
    # scheduler too, before a py-spy dump and a CUDA coredump that a CPU server has no use
    # for (both releases): these servers are stopped by process group.
    "SGLANG_PYSPY_DUMP_BEFORE_CRASH": "0",
    "SGLANG_CUDA_COREDUMP_BEFORE_CRASH": "0",
    **cpu_server_env(),
}
SERVER_FLAGS = ["--host", "127.0.0.1", "--max-total-tokens", "16384"]
# --sleep-on-idle: an idle SGLang scheduler otherwise polls its sockets at 100 % of a
# core (an idle PD pair takes both cores of a 2-core machine); it sleeps only when
# every queue, the PD bootstrap/transfer queues included, is empty.
CPU_FLAGS = ["--device", "cpu", "--sleep-on-idle"]
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


# uvicorn's line when a server's HTTP port was taken: the process lives on without HTTP
HTTP_BIND_FAILED = "error while attempting to bind on address"


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text[-lines:])


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def server_ready(url: str) -> bool:
    """An SGLang server answers ``/health``."""
    return requests.get(f"{url}/health", timeout=5).status_code == 200


def wait_healthy(
    targets: list[tuple[ManagedProcess, str]],
    t0: float,
    timeout_s: float,
    ready: Any = server_ready,
) -> None:
    """Wait until ``ready(url)`` holds for every (process, url), counting from ``t0``;
    :class:`DeploymentError` when a process exits or the time is up."""
    deadline = t0 + timeout_s
    pending = dict(targets)
    while pending:
        for proc, url in list(pending.items()):
            if not proc.alive():
                raise DeploymentError(
                    f"{proc.name} exited with code {proc.popen.returncode} during startup"
                )
            if HTTP_BIND_FAILED in tail(proc.log_path, 40):  # alive, but never serving
                raise DeploymentError(
                    f"{proc.name} lost its HTTP port during startup (EADDRINUSE: taken"
                    " between the pick and uvicorn's bind)"
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


@dataclass(eq=False)
class ManagedProcess:
    """A child process in its own process group, logging to one file."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None
    cwd: Path | None = None  # default: the log folder

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
                cwd=str(self.cwd or self.log_path.parent),
                start_new_session=True,  # own process group: killpg reaches its children
            )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def group_members(self) -> list[int]:
        """PIDs of live (non-zombie) processes in this process group."""
        import psutil

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

    def kill(self) -> None:
        """SIGKILL the whole process group now (fault tests) and reap the leader."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while self.group_members() and time.monotonic() < deadline:
            self.popen.poll()
            time.sleep(0.2)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

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

    def wait(self, timeout_s: float) -> int | None:
        """Wait for the process to exit; its exit code (None after ``timeout_s``)."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None


@dataclass(eq=False)
class SingleServer:
    """One non-disaggregated SGLang server (the reference PD outputs are compared with)."""

    model_path: str | os.PathLike[str]
    args: Sequence[str] = ()
    log_dir: str | os.PathLike[str] | None = None
    device: str | None = None
    startup_timeout_s: float = 300.0
    python: str = sys.executable

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="single-"))
        self.port = free_port()
        self.device = self.device or ("cuda" if _has_cuda() else "cpu")
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> SingleServer:
        env = dict(os.environ)
        if self.device == "cpu":
            env.update(CPU_ENV)
        cmd = [
            self.python, "-m", "sglang.launch_server", "--model-path", str(self.model_path),
            "--port", str(self.port), *SERVER_FLAGS,
            *(CPU_FLAGS if self.device == "cpu" else []), *self.args,
        ]  # fmt: skip
        self.proc = ManagedProcess("single", cmd, Path(self.log_dir, "single.log"), env)
        self.proc.start()
        try:
            wait_healthy([(self.proc, self.url)], time.monotonic(), self.startup_timeout_s)
        except DeploymentError as e:
            raise DeploymentError(f"{e}:\n{self.proc.tail()}") from None
        return self

    def generate(self, text: str, max_new_tokens: int = 16, **sampling: Any) -> dict[str, Any]:
        body = {
            "text": text,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, **sampling},
        }
        r = requests.post(f"{self.url}/generate", json=body, timeout=180)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> SingleServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@dataclass(eq=False)
class PDDeployment:
    """Prefill + decode + router for one model and one transfer backend."""

    model_path: str | os.PathLike[str]
    backend: str = "mooncake"
    decode_backend: str | None = None  # default: same as ``backend``
    prefill_args: Sequence[str] = ()
    decode_args: Sequence[str] = ()
    common_args: Sequence[str] = ()  # given to both servers
    prefill_env: Mapping[str, str] = field(default_factory=dict)
    decode_env: Mapping[str, str] = field(default_factory=dict)
    router_args: Sequence[str] = ()
    log_dir: str | os.PathLike[str] | None = None
    startup_timeout_s: float = 300.0
    mini_lb: bool = False
    stats: bool = False  # SGLANG_SPECTRUM_STATS_FILE=log_dir/spectrum_stats.jsonl on both
    device: str | None = None  # None: cuda if available, else cpu
    python: str = sys.executable
    procs: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix=f"pd-{self.backend}-"))
        self.prefill_port = free_port()
        self.decode_port = free_port()
        self.bootstrap_port = free_port()
        self.router_port = free_port()
        self.router_metrics_port = free_port()
        self.startup_s = float("nan")
        if self.device is None:
            self.device = "cuda" if _has_cuda() else "cpu"

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

    @property
    def stats_path(self) -> Path:
        return Path(self.log_dir, "spectrum_stats.jsonl")

    def proc(self, name: str) -> ManagedProcess:
        for p in reversed(self.procs):
            if p.name == name:
                return p
        raise KeyError(name)

    # ------------------------------------------------------------------ lifecycle

    def _env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        if self.device == "cpu":
            env.update(CPU_ENV)
        if self.stats:
            env["SGLANG_SPECTRUM_STATS_FILE"] = str(self.stats_path)
        env.update(extra)
        return env

    def _server_cmd(self, mode: str, port: int, extra: Sequence[str]) -> list[str]:
        backend = self.decode_backend if mode == "decode" and self.decode_backend else self.backend
        return [
            self.python, "-m", "sglang.launch_server",
            "--model-path", str(self.model_path),
            "--port", str(port),
            *SERVER_FLAGS,
            *(CPU_FLAGS + cpu_server_flags(mode) if self.device == "cpu" else []),
            "--disaggregation-mode", mode,
            "--disaggregation-transfer-backend", backend,
            "--disaggregation-bootstrap-port", str(self.bootstrap_port),
            *self.common_args,
            *extra,
        ]  # fmt: skip

    def _new_server(self, mode: str) -> ManagedProcess:
        port = self.prefill_port if mode == "prefill" else self.decode_port
        args = self.prefill_args if mode == "prefill" else self.decode_args
        env = self.prefill_env if mode == "prefill" else self.decode_env
        return ManagedProcess(
            mode,
            self._server_cmd(mode, port, args),
            Path(self.log_dir, f"{mode}.log"),
            self._env(env),
        )

    def start(self, attempts: int = 2) -> PDDeployment:
        """Start prefill, decode and router. A server that lost a port between its pick
        and its bind (SGLang 0.5.17 draws its ``torch.distributed`` port from the kernel's
        ephemeral range, where any outgoing connection may take it; or the HTTP port
        :func:`free_port` picked: EADDRINUSE) means a new start on new ports, not a
        failed deployment."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except DeploymentError as e:
                if attempt + 1 == attempts or "EADDRINUSE" not in str(e):
                    raise
                print("launch: a port was taken during startup; starting again", file=sys.stderr)
                for p in self.procs:  # (kept beside the new logs)
                    if p.log_path.exists():
                        p.log_path.rename(p.log_path.with_suffix(f".attempt{attempt + 1}.log"))
                self.procs = []
                self.prefill_port, self.decode_port = free_port(), free_port()
                self.bootstrap_port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> PDDeployment:
        t0 = time.monotonic()
        try:
            prefill, decode = self._new_server("prefill"), self._new_server("decode")
            for p in (prefill, decode):
                self.procs.append(p)
                p.start()
            self._wait_healthy([(prefill, self.prefill_url), (decode, self.decode_url)], t0)
            self._start_router()
        except BaseException as e:
            report = self.report(f"PD deployment ({self.backend}) failed to start: {e}")
            self.stop()
            if not isinstance(e, KeyboardInterrupt):
                print(report, file=sys.stderr)
            if isinstance(e, DeploymentError):
                raise DeploymentError(report) from None
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _start_router(self, attempts: int = 3) -> None:
        """Start the router on ports picked just now; a port taken in between (by
        any process's outgoing connection, say) means a new pair of ports, not a
        failed deployment."""
        for attempt in range(attempts):
            self.router_port, self.router_metrics_port = free_port(), free_port()
            router_cmd = [
                self.python, "-m", "sglang_router.launch_router", "--pd-disaggregation",
                "--prefill", self.prefill_url, str(self.bootstrap_port),
                "--decode", self.decode_url,
                "--host", HOST, "--port", str(self.router_port),
                "--prometheus-host", HOST, "--prometheus-port", str(self.router_metrics_port),
                *self.router_args,
            ] + (["--mini-lb"] if self.mini_lb else [])  # fmt: skip
            log = Path(self.log_dir, "router.log" if not attempt else f"router.{attempt}.log")
            router = ManagedProcess("router", router_cmd, log, self._env({}))
            self.procs.append(router)
            router.start()
            try:
                self._wait_healthy(
                    [(router, self.router_url)], time.monotonic(), 120, self._router_ready
                )
                return
            except DeploymentError:
                in_use = "Address already in use" in tail(log, 200)
                if not in_use or attempt == attempts - 1:
                    raise
                router.stop()
                self.procs.remove(router)

    def kill_decode(self) -> None:
        """SIGKILL the decode server's process group (fault tests)."""
        self.proc("decode").kill()

    def restart_decode(self, timeout_s: float | None = None) -> float:
        """Start a new decode server on the same ports (after :meth:`kill_decode`);
        returns once it and the router's view of it are healthy. Returns seconds."""
        t0 = time.monotonic()
        old = self.proc("decode")
        if old.alive():
            old.stop()
        decode = self._new_server("decode")
        self.procs.insert(self.procs.index(old) + 1, decode)
        decode.start()
        self._wait_healthy([(decode, self.decode_url)], t0, timeout_s)
        if any(p.name == "router" for p in self.procs):
            # a router that took the decode out (failed health checks) routes to it again
            # only after its next successful check: requests sent before that would fail
            self._wait_healthy(
                [(self.proc("router"), self.router_url)], t0, timeout_s, self._router_ready
            )
        return time.monotonic() - t0

    @staticmethod
    def _router_ready(url: str) -> bool:
        # /health answers before the workers are registered; /readiness waits for them
        if requests.get(f"{url}/readiness", timeout=5).status_code != 200:
            return False
        body = requests.get(f"{url}/workers", timeout=5).json()
        workers = body.get("workers") or []
        if workers and all("is_healthy" in w for w in workers):  # and for their health
            healthy = {w.get("worker_type") for w in workers if w.get("is_healthy")}
            return {"prefill", "decode"} <= healthy
        stats = body.get("stats", {})
        return stats.get("prefill_count", 0) >= 1 and stats.get("decode_count", 0) >= 1

    def _wait_healthy(
        self,
        targets: list[tuple[ManagedProcess, str]],
        t0: float,
        timeout_s: float | None = None,
        ready: Any = None,
    ) -> None:
        wait_healthy(targets, t0, timeout_s or self.startup_timeout_s, ready or server_ready)

    def stop(self) -> None:
        """Stop router, decode, prefill (each process group by PID, all signalled at
        once so their shutdowns overlap); idempotent."""
        with ThreadPoolExecutor(max(1, len(self.procs))) as pool:
            futures = {pool.submit(proc.stop): proc for proc in reversed(self.procs)}
        for future, proc in futures.items():
            if future.exception() is not None:  # the others were stopped all the same
                print(f"launch: stopping {proc.name} failed: {future.exception()}", file=sys.stderr)

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
        self,
        text: str,
        max_new_tokens: int = 16,
        timeout_s: float = 180.0,
        rid: str | None = None,
        **sampling: Any,
    ) -> dict[str, Any]:
        """Greedy ``/generate`` through the router; raises on HTTP errors (with the body).

        ``rid`` (optional) is the request id on both servers (it names the
        request in the SpectrumKV stats of prefill and decode)."""
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, **sampling}
        body: dict[str, Any] = {"text": text, "sampling_params": params}
        if rid is not None:
            body["rid"] = rid
        r = requests.post(f"{self.router_url}/generate", json=body, timeout=timeout_s)
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

    # ------------------------------------------------------------------ observation

    @staticmethod
    def metrics_text(url: str) -> str:
        """The Prometheus text of a server (``--enable-metrics``)."""
        r = requests.get(f"{url}/metrics", timeout=10)
        r.raise_for_status()
        return r.text

    def metric(self, url: str, name: str, **labels: str) -> float:
        from .metrics import parse_prometheus

        return parse_prometheus(self.metrics_text(url), name, **labels)

    @staticmethod
    def used_tokens(url: str) -> int:
        """KV tokens held by requests (running + queued, not evictable cache), from
        ``/v1/loads`` (SGLang 0.5.17 and 0.5.23; ``/get_load`` is gone in 0.5.23)."""
        r = requests.get(f"{url}/v1/loads", params={"include": "core"}, timeout=10)
        r.raise_for_status()
        return sum(int(d.get("num_total_tokens", 0)) for d in r.json().get("loads", []))

    def wait_idle(self, url: str, idle: int = 0, timeout_s: float = 60.0) -> int:
        """Wait until ``used_tokens(url) <= idle``; returns the last value seen."""
        deadline = time.monotonic() + timeout_s
        n = self.used_tokens(url)
        while n > idle and time.monotonic() < deadline:
            time.sleep(0.5)
            n = self.used_tokens(url)
        return n

    def spectrum_stats(self) -> list[dict[str, Any]]:
        from .metrics import read_stats

        return read_stats(self.stats_path)
