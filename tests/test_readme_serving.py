"""The README's "Serving with SGLang" commands, run as written (slow).

The fenced ``bash`` block of that section is read from README.md: each command
runs from the repository root (where the top-level ``kernels/`` folder must not
shadow the ``kernels`` package that transformers probes for), with ``M``
replaced by SmolLM2's folder, the documented ports by free ones and the CPU
settings its first comment names. The prefill and decode servers and the
router start, ``sglang.bench_serving`` runs against the router as written (10
prompts of 1024 tokens), and every prompt is answered. Processes are stopped by
PID, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
from bench_modules import serving_gpu
from pd_harness import ManagedProcess, free_port

from sglang_spectrum.models import ensure_model
from sglang_spectrum.sglang_plugin.launch import DeploymentError, PDDeployment, wait_healthy

router_ready = PDDeployment._router_ready
request_ttfts_ms = serving_gpu("serving_gpu_records").request_ttfts_ms

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Serving with SGLang"


def readme_commands() -> tuple[dict[str, str], list[list[str]]]:
    """(the CPU environment of the block's first comment, the commands of the block)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    comment = " ".join(line.lstrip("# ") for line in block.splitlines() if line.startswith("#"))
    env = dict(re.findall(r"\b([A-Z][A-Z_]+)=(\S+)", comment))
    env["FLAGS"] = re.search(r"and (--device cpu.*?) on both servers", comment).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("python -m "):
            commands.append(shlex.split(line))
    return env, commands


def test_readme_names_the_four_commands():
    env, commands = readme_commands()
    assert {"SGLANG_USE_CPU_ENGINE", "MC_FORCE_TCP", "FLAGS"} <= set(env)
    assert env["FLAGS"].split()[:2] == ["--device", "cpu"]
    mods = [c[2] for c in commands]
    assert mods == ["sglang.launch_server"] * 2 + ["sglang_router.launch_router"] + [
        "sglang.bench_serving"
    ]


def test_readme_serving_commands_run_from_the_repository_root(request, tmp_path):
    env_extra, commands = readme_commands()
    model = str(ensure_model("smollm2-135m"))
    ports = {p: str(free_port()) for p in ("30000", "30001", "8000", "8998")}
    cpu_flags = env_extra.pop("FLAGS").split()

    def adapt(cmd: list[str]) -> list[str]:
        out = [sys.executable if c == "python" else c for c in cmd]
        out = [model if c == "M" else c for c in out]
        out = [re.sub(r"\b(30000|30001|8000|8998)\b", lambda m: ports[m.group(1)], c) for c in out]
        if "sglang.launch_server" in out:
            out += cpu_flags
            if "--disaggregation-mode" in out and "--disaggregation-bootstrap-port" not in out:
                if out[out.index("--disaggregation-mode") + 1] == "prefill":
                    out += ["--disaggregation-bootstrap-port", ports["8998"]]
        return out

    env = {**os.environ, **env_extra}
    env.pop("PYTHONSAFEPATH", None)  # as a user's shell: the working directory is on sys.path
    prefill, decode = (adapt(c) for c in commands[:2])
    procs = []
    t0 = time.monotonic()
    for name, cmd in (("prefill", prefill), ("decode", decode)):
        p = ManagedProcess(name, cmd, tmp_path / f"{name}.log", env, cwd=ROOT)
        request.addfinalizer(p.stop)
        p.start()
        procs.append((p, f"http://127.0.0.1:{ports['30000' if name == 'prefill' else '30001']}"))
    wait_healthy(procs, t0, timeout_s=600)
    for attempt in range(3):  # the router's port picked now: the servers bind many meanwhile
        ports["8000"] = str(free_port())
        router, bench = (adapt(c) for c in commands[2:])
        log = tmp_path / f"router{attempt}.log"
        r = ManagedProcess("router", router, log, env, cwd=ROOT)
        request.addfinalizer(r.stop)
        r.start()
        try:
            url = f"http://127.0.0.1:{ports['8000']}"
            wait_healthy([(r, url)], time.monotonic(), 120, router_ready)
            break
        except DeploymentError:  # a port taken in between: new ones, as PDDeployment does
            if attempt == 2 or "Address already in use" not in log.read_text(errors="replace"):
                raise
            r.stop()
    out = tmp_path / "bench.jsonl"
    b = ManagedProcess(
        "bench",
        [*bench, "--output-file", str(out), "--output-details"],  # as bench/serving_gpu.py asks
        tmp_path / "bench.log",
        env,
        cwd=ROOT,
    )
    request.addfinalizer(b.stop)
    b.start()
    assert b.wait(timeout_s=900) == 0, b.tail()
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == 10, result
    # every request's TTFT, in the form the GPU serving report's intervals read
    assert len(request_ttfts_ms(result)) == 10, {k: result.get(k) for k in ("ttfts", "errors")}
    logs = "".join(
        (tmp_path / f"{n}.log").read_text(errors="replace") for n in ("prefill", "decode")
    )
    assert "plugin disabled" not in logs and "attempted relative import" not in logs
