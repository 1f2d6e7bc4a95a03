"""Child processes of bench/serving_gpu.py: servers and proxies in their own process
groups (logs per process), stopped all at once; readiness polling and a small HTTP
client (same shape as sglang_spectrum.sglang_plugin.launch.ManagedProcess, kept here so
that the GPU harness needs nothing but the standard library); and :class:`Launcher`,
which builds the server, PD-pair and proxy command lines and environments of a backend
config (serving_gpu_configs.Config) and reads each server's KV capacity."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serving_gpu_configs as configs  # loaded by serving_gpu.py (bench/ is off sys.path)

HOST = "127.0.0.1"
PY = sys.executable
HERE = Path(__file__).resolve().parent
GPU_FLAGS = ["--attention-backend", "flashinfer", "--grammar-backend", "none"]
GPU_FLAGS += ["--disable-cuda-graph"]  # CUDA-graph capture costs minutes per server
CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "OMP_NUM_THREADS": "1",
    # as launch.CPU_ENV: no 5 s sleep before crash diagnostics on each stop by process group
    "SGLANG_PYSPY_DUMP_BEFORE_CRASH": "0",
    "SGLANG_CUDA_COREDUMP_BEFORE_CRASH": "0",
}
WIKITEXT = HERE / "gpu_wikitext.txt"
# SGLang's startup line (scheduler.py, INFO): "max_total_num_tokens=N, chunked_prefill..."
MAX_TOKENS_RE = re.compile(r"max_total_num_tokens=(\d+)")
T_START = time.monotonic()  # the harness's start: deadlines and log times count from it


def log(msg: str) -> None:
    print(f"[serving_gpu {time.monotonic() - T_START:6.0f}s] {msg}", flush=True)


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free TCP port, never one this process handed out before (servers started
    together must not race for the same one)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


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

    def log_size(self) -> int:
        """Bytes in the log so far (where what it writes next begins)."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, start: int) -> str:
        """The log's text after byte ``start`` ('' if unreadable)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

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


# ---------------------------------------------------------------------------- deployments


@dataclass(eq=False)
class Deployment:
    """A single server or a PD pair (+ proxy) of one backend config."""

    tag: str
    cfg: Any = None  # serving_gpu_configs.Config; None: a single server
    procs: list[Proc] = field(default_factory=list)
    url: str = ""  # the single server, or the proxy in front of the pair
    stats_path: Path | None = None
    servers: dict[str, tuple[Proc, str]] = field(default_factory=dict)  # role -> (proc, url)
    targets: list[tuple[Proc, str]] = field(default_factory=list)  # readiness URLs
    startup_s: float = float("nan")
    max_tokens: dict[str, int | None] = field(default_factory=dict)  # role -> KV capacity

    def dead(self) -> Proc | None:
        return next((p for p in self.procs if not p.alive()), None)


def _find_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj and obj[key] is not None:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def kv_capacity(proc: Proc, url: str) -> int | None:
    """The server's KV capacity in tokens (SGLang's ``max_total_num_tokens``): from its
    startup log line (logged at INFO) in this start's part of the log, else from
    ``/server_info`` (the scheduler info it carries)."""
    try:
        text = proc.log_path.read_text(errors="replace")
        found = MAX_TOKENS_RE.findall(text[text.rfind("\n=== ") :])
        if found:
            return int(found[-1])
    except OSError:
        pass
    for path in ("/server_info", "/get_server_info"):
        st, data = http(url + path, timeout=15)
        if st == 200:
            try:
                v = _find_key(json.loads(data), "max_total_num_tokens")
                return int(v) if v is not None else None
            except (ValueError, TypeError):
                return None
    return None


class Launcher:
    """Starts servers, PD pairs and proxies on this machine and stops them."""

    def __init__(self, work: Path, cpu: bool, split: bool, cpu_max_tokens: int):
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cpu = cpu
        self.split = split  # prefill on GPU 0, decode on GPU 1
        self.cpu_max_tokens = cpu_max_tokens
        self.live: list[Deployment] = []

    def env(self, cfg: Any = None, stats: Path | None = None) -> dict[str, str]:
        """The inherited environment without any link variable, plus ``cfg``'s link."""
        env = {k: v for k, v in os.environ.items() if k not in configs.LINK_ENV_KEYS}
        # PYTHONSAFEPATH: neither the cwd nor bench/ on sys.path (the repo's kernels/ and
        # bench/kernels.py would shadow the `kernels` package transformers probes for)
        env.update(PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")
        env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
        # the INT4 probe (--spectrum-tiers auto) reads WikiText: the text that travels
        env.setdefault("SPECTRUM_WIKITEXT", str(WIKITEXT))
        if self.cpu:
            env.update(CPU_ENV)
        env.pop("SGLANG_SPECTRUM_STATS_FILE", None)
        if cfg is not None:
            env.update(cfg.env())
        if stats is not None:
            env["SGLANG_SPECTRUM_STATS_FILE"] = str(stats)
        return env

    def device_flags(self, mode: str, mem: float, gpu: int, tokens: int | None) -> list[str]:
        if self.cpu:
            flags = ["--device", "cpu", "--sleep-on-idle"]  # an idle scheduler spins a core
            flags += ["--max-total-tokens", str(tokens or self.cpu_max_tokens)]
            try:
                from sglang_spectrum.sglang_plugin.compat import cpu_server_flags

                flags += cpu_server_flags(mode)
            except Exception:
                pass
            return flags
        flags = list(GPU_FLAGS) + ["--mem-fraction-static", f"{mem:g}"]
        flags += ["--max-total-tokens", str(tokens)] if tokens else []
        return flags + (["--base-gpu-id", str(gpu)] if gpu else [])

    def server(
        self, name: str, model: str, mode: str, mem: float, gpu: int, extra: list[str],
        env: dict[str, str], tokens: int | None = None, tp: int = 1,
    ) -> tuple[Proc, str]:  # fmt: skip
        port = free_port()
        cmd = [PY, "-m", "sglang.launch_server", "--model-path", model]
        cmd += ["--host", HOST, "--port", str(port)]
        if mode in ("prefill", "decode"):  # SGLang's own per-request stages (INFO lines)
            cmd += ["--log-level", "info", "--enable-request-time-stats-logging"]
        else:
            cmd += ["--log-level", "warning"]
        # torch's rendezvous port chosen here: SGLang's own pick raced between the ~11
        # servers of the correct phase starting at once (EADDRINUSE, H200 2026-12-03)
        cmd += ["--nccl-port", str(free_port())]
        cmd += self.device_flags(mode, mem, gpu, tokens) + extra
        cmd += ["--tp-size", str(tp)] if tp > 1 else []
        return Proc(name, cmd, self.logs / f"{name}.log", env), f"http://{HOST}:{port}"

    def single(
        self, tag: str, model: str, mem: float, extra: list[str], kv_dtype: str = configs.BF16,
        tp: int = 1, bf16_tokens: int | None = None,
    ) -> Deployment:  # fmt: skip
        """A non-disaggregated server; ``bf16_tokens``: its KV pool in 16-bit tokens."""
        tokens = configs.token_cap(kv_dtype, bf16_tokens)
        flags = configs.kv_flags(kv_dtype) + extra
        p, url = self.server(
            f"{tag}-single", model, "single", mem, 0, flags, self.env(), tokens, tp
        )
        dep = Deployment(tag, None, [p.start()], url, servers={"single": (p, url)})
        dep.targets = [(p, url + "/health")]
        self.live.append(dep)
        return dep

    def pair(
        self, tag: str, model: str, cfg: Any, mem: tuple[float, float], extra: list[str],
        tiers: str | None = None, tp: int = 1, bf16_tokens: int | None = None,
        start: bool = True,
    ) -> Deployment:  # fmt: skip
        """A PD pair of ``cfg`` and its proxy; ``tp`` > 1: both servers over GPUs
        0..tp-1; ``bf16_tokens``: each KV pool in 16-bit tokens (FP8: twice the tokens);
        ``start=False``: the commands only."""
        stats = self.work / f"{tag}.stats.jsonl"
        stats.unlink(missing_ok=True)
        env = self.env(cfg, stats)
        boot = free_port()
        modes = {
            "prefill": ["--disaggregation-mode", "prefill"]
            + ["--disaggregation-bootstrap-port", str(boot)],
            "decode": ["--disaggregation-mode", "decode"],
        }
        dep = Deployment(tag, cfg, stats_path=stats)
        for i, (role, flags) in enumerate(modes.items()):
            gpu = 1 if i and self.split and tp == 1 else 0
            tokens = cfg.max_tokens(role, bf16_tokens)
            p, url = self.server(
                f"{tag}-{role}", model, role, mem[i], gpu,
                flags + cfg.flags(role, tiers) + extra, env, tokens, tp,
            )  # fmt: skip
            dep.servers[role] = (p.start() if start else p, url)
            dep.procs.append(p)
            dep.targets.append((p, url + "/health"))
        port = free_port()
        pre_url, dec_url = dep.servers["prefill"][1], dep.servers["decode"][1]
        cmd = [PY, str(HERE / "pd_proxy.py"), "--prefill", pre_url, str(boot)]
        cmd += ["--decode", dec_url, "--port", str(port)]
        proxy = Proc(f"{tag}-proxy", cmd, self.logs / f"{tag}-proxy.log", self.env())
        dep.procs.append(proxy.start() if start else proxy)
        dep.url = f"http://{HOST}:{port}"
        dep.targets.append((proxy, dep.url + "/health"))
        if start:
            self.live.append(dep)
        return dep

    def wait(self, deps: list[Deployment], limit_s: float) -> float:
        """Wait until every server and proxy of ``deps`` answers, read each server's KV
        capacity; the seconds it took."""
        t0 = time.monotonic()
        wait_ready([t for d in deps for t in d.targets], limit_s)
        took = time.monotonic() - t0
        for d in deps:
            d.startup_s = took
            d.max_tokens = {role: kv_capacity(p, url) for role, (p, url) in d.servers.items()}
        return took

    def stop(self, deps: list[Deployment]) -> None:
        stop_all([p for d in deps for p in d.procs])
        self.live = [d for d in self.live if d not in deps]

    def stop_all(self) -> None:
        self.stop(list(self.live))
