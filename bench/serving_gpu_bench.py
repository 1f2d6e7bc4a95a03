"""``sglang.bench_serving`` points for bench/serving_gpu.py, run in one long-lived process.

Every point is bench_serving's own ``run_benchmark`` with the arguments its command line
parses to (``cli_main`` with ``run_benchmark`` intercepted): the same code, requests,
metrics and ``--output-file`` line as ``python -m sglang.bench_serving ARGS``. What the
worker saves is the start of a fresh interpreter per point (imports of sglang and
transformers, ~15-20 s of each ~30 s point on the H200). ``--bench-mode process`` in
serving_gpu.py runs ``python -m sglang.bench_serving`` per point instead.

    python bench/serving_gpu_bench.py        # worker: JSON requests on stdin

Protocol: the worker prints ``{"ready": true, "import_s": ...}`` once, then reads one
``{"argv": [...], "log": PATH}`` line per point and answers one ``{"ok": bool, "error":
..., "s": ...}`` line; during a point, its stdout and stderr (file descriptors 1 and 2)
go to PATH. :class:`BenchClient` is the harness side.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

THIS = Path(__file__).resolve()


class _Parsed(Exception):
    pass


def _serving_module():
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import sglang.benchmark.serving as serving
    except ImportError:  # older SGLang: the implementation lives in bench_serving
        import sglang.bench_serving as serving
    return serving


def parse_argv(serving, argv: list[str]):
    """bench_serving's Namespace for ``argv``: its cli_main, stopped at run_benchmark."""
    box = {}

    def capture(args):
        box["args"] = args
        raise _Parsed

    original, old_argv = serving.run_benchmark, sys.argv
    serving.run_benchmark, sys.argv = capture, ["bench_serving", *argv]
    try:
        serving.cli_main()
    except _Parsed:
        pass
    finally:
        serving.run_benchmark, sys.argv = original, old_argv
    return box["args"]


def worker() -> int:
    t = time.monotonic()
    ctl = os.fdopen(os.dup(1), "w", buffering=1)
    serving = _serving_module()
    ctl.write(json.dumps({"ready": True, "import_s": round(time.monotonic() - t, 1)}) + "\n")
    saved = os.dup(1), os.dup(2)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        t = time.monotonic()
        ok, error = False, None
        with open(req["log"], "ab") as fh:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            try:
                serving.run_benchmark(parse_argv(serving, req["argv"]))
                ok = True
            except BaseException as e:  # noqa: BLE001 (SystemExit from bench_serving too)
                error = f"{type(e).__name__}: {e}"
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        ctl.write(json.dumps({"ok": ok, "error": error, "s": time.monotonic() - t}) + "\n")
    return 0


class BenchClient:
    """The harness side: one worker process (restarted after a failure or timeout), or
    one ``python -m sglang.bench_serving`` per point (``mode="process"``, and whenever
    the worker cannot start)."""

    def __init__(self, python: str, env: dict, cwd: Path, log: Path, mode: str = "worker"):
        self.python, self.env, self.cwd, self.log, self.mode = python, env, cwd, log, mode
        self.proc: subprocess.Popen | None = None
        self.import_s: float | None = None

    def _start(self, timeout_s: float) -> bool:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [self.python, str(THIS)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=fh,
                env=self.env,
                cwd=self.cwd,
                text=True,
                start_new_session=True,
            )
        msg = self._read(timeout_s)
        if not msg or not msg.get("ready"):
            self.close()
            return False
        self.import_s = msg.get("import_s")
        return True

    def _read(self, timeout_s: float) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(1.0, timeout_s))
        if not ready:
            return None
        line = self.proc.stdout.readline()
        try:
            return json.loads(line) if line else None
        except ValueError:
            return None

    def run(self, argv: list[str], log: Path, timeout_s: float) -> str:
        """One point; its return: "0", "timeout" or an error text (the log has more)."""
        t = time.monotonic()
        if self.mode == "worker" and self.proc is None and not self._start(min(120, timeout_s)):
            self.mode = "process"  # the worker could not start: a process per point
        timeout_s -= time.monotonic() - t
        if self.mode == "process":
            return self._run_process(argv, log, timeout_s)
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            self.close()
            return f"worker gone: {e}"
        msg = self._read(timeout_s)
        if msg is None:
            self.close()
            return "timeout"
        return "0" if msg.get("ok") else str(msg.get("error"))

    def _run_process(self, argv: list[str], log: Path, timeout_s: float) -> str:
        cmd = [self.python, "-m", "sglang.bench_serving", *argv]
        with open(log, "ab") as fh:
            try:
                rc = subprocess.run(
                    cmd,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=max(20, timeout_s),
                    env=self.env,
                    cwd=self.cwd,
                ).returncode
            except subprocess.TimeoutExpired:
                return "timeout"
        return str(rc)

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None


if __name__ == "__main__":
    sys.exit(worker())
