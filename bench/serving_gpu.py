"""SGLang PD serving with SpectrumKV on a GPU: correctness with real weights and TTFT
against stock Mooncake (issue 12). Runs on the GPU machine after scripts/gpu_setup.sh,
normally through scripts/gpu_serving.sh; see bench/README.md "GPU deployment".

    python bench/serving_gpu.py --phases correct,speed,report --deadline-s 540

Phases (each selectable; state kept in --state so a later call resumes where the last
one stopped while the machine stays warm; --deadline-s makes a call stop in time and
write what it has):

* ``correct``: SmolLM2-135M (real weights, --smollm) on a single non-disaggregated
  server and on two PD pairs behind bench/pd_proxy.py, all started at once:
  ``spectrum`` at ``--spectrum-budget 1.0`` (greedy outputs must equal the single
  server's) and at 0.5 with the server's default codec (a passcode stated at the start
  of a ~2.5k-token WikiText prompt must be answered). The stats file lines
  (SGLANG_SPECTRUM_STATS_FILE) show the path (kernels or torch) and the timings.
* ``speed``: the Llama-3-8B-shaped dummy model (--model8b); one PD pair per backend
  config (--configs, default ``mooncake,spectrum:0.5,spectrum:0.3``), restarted
  between; ``python -m sglang.bench_serving --backend sglang --dataset-name random-ids``
  through the proxy at every --lengths x --concurrency point (prompt ids sent as ids,
  prefix cache flushed after the warm-up). The servers run ``--chunked-prefill-size
  8192``, so the 16384 point is the prompt at 2x the chunked-prefill size. One record
  per point with TTFT mean/p50/p99, req/s, bytes per request and, for spectrum, the
  median pack/transfer/unpack ms and link rate (sent bytes / transfer time) from the
  stats file.
* ``report``: $OUT/serving_gpu.json (records), serving_gpu.md (tables), serving_gpu.png
  (TTFT p50 against prompt length), serving_gpu_correct.json, serving_gpu_logs.tgz.

Server flags: --attention-backend flashinfer --grammar-backend none --disable-cuda-graph
--host 127.0.0.1, MC_FORCE_TCP=1. One GPU: both servers share it (memory fractions);
two or more GPUs: prefill on GPU 0, decode on GPU 1. ``--cpu`` runs the same on a
CPU-only SGLang (for checking the script here, not for numbers).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PY = sys.executable
CHUNKED_PREFILL = 8192
GPU_FLAGS = ["--attention-backend", "flashinfer", "--grammar-backend", "none"]
GPU_FLAGS += ["--disable-cuda-graph"]  # CUDA-graph capture costs minutes per server
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1"}
WIKITEXT = HERE / "gpu_wikitext.txt"
RECORD_KEYS = (
    "backend budget key_scales input_len concurrency ttft_mean_ms ttft_p50_ms ttft_p99_ms "
    "req_per_s bytes_per_req pack_ms transfer_ms unpack_ms link_gbps hardware"
).split()
GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "List three prime numbers:",
    "def fibonacci(n):",
]
QUESTION = "What is the passcode stated at the beginning of the text? Answer with the number only."
ANSWER_PREFIX = "The passcode is"

T_START = time.monotonic()


def _load(name: str):
    """bench/<name>.py, loaded by path: bench/ stays off sys.path (its kernels.py would
    shadow the ``kernels`` package transformers probes for)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


_report = _load("serving_gpu_report")
_procs = _load("serving_procs")
Proc, free_port, http = _procs.Proc, _procs.free_port, _procs.http
stop_all, wait_ready = _procs.stop_all, _procs.wait_ready
read_jsonl, per_rank, plot = _report.read_jsonl, _report.per_rank, _report.plot
markdown, summary = _report.markdown, _report.summary


def log(msg: str) -> None:
    print(f"[serving_gpu {time.monotonic() - T_START:6.0f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------- runner


@dataclass
class Deployment:
    """A single server or a PD pair (+ proxy) of one backend config."""

    tag: str
    procs: list[Proc] = field(default_factory=list)
    url: str = ""
    stats_path: Path | None = None
    startup_s: float = float("nan")

    def stop(self) -> None:
        stop_all(self.procs)


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work_dir)
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = Path(args.state)
        self.state = self._load_state()
        self.deadline = T_START + args.deadline_s
        self.gpus, self.gpu_name = self._gpus()
        self.live: list[Deployment] = []

    # -------------------------------------------------------------- state and env

    def _load_state(self) -> dict:
        try:
            st = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            st = {}
        st.setdefault("records", [])
        st.setdefault("correct", None)
        st.setdefault("sec_per_req", {})
        return st

    def save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_path)
        self.write_outputs()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _gpus(self) -> tuple[int, str]:
        if self.args.cpu:
            return 0, "cpu"
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.split("\n")
            names = [n.strip() for n in out if n.strip()]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            n = len(visible.split(",")) if visible else len(names)
            return n, names[0] if names else "unknown GPU"
        except (OSError, subprocess.SubprocessError):
            return 1, "unknown GPU"

    def hardware(self, tp: int = 1) -> str:
        if self.args.cpu:
            return f"CPU ({os.cpu_count()} cores), Mooncake TCP loopback"
        where = "prefill GPU 0 -> decode GPU 1" if self.split() else "prefill and decode on 1 GPU"
        if tp > 1:
            where = f"TP {tp}: prefill and decode each on GPUs 0-{tp - 1}"
        return f"{self.gpu_name} x{self.gpus}; {where}; Mooncake TCP loopback (MC_FORCE_TCP=1)"

    def split(self) -> bool:
        return self.gpus >= 2 and not self.args.one_gpu

    def env(self, stats: Path | None) -> dict[str, str]:
        env = dict(os.environ)
        # PYTHONSAFEPATH: neither the cwd nor bench/ on sys.path (the repo's kernels/ and
        # bench/kernels.py would shadow the `kernels` package transformers probes for)
        env.update(MC_FORCE_TCP="1", PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")
        env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
        # the INT4 probe (--spectrum-tiers auto) reads WikiText: the text that travels
        env.setdefault("SPECTRUM_WIKITEXT", str(WIKITEXT))
        if self.args.cpu:
            env.update(CPU_ENV)
        env.pop("SGLANG_SPECTRUM_STATS_FILE", None)
        if stats is not None:
            env["SGLANG_SPECTRUM_STATS_FILE"] = str(stats)
        return env

    def device_flags(self, mode: str, mem: float, gpu: int) -> list[str]:
        if self.args.cpu:
            flags = ["--device", "cpu", "--max-total-tokens", str(self.args.cpu_max_tokens)]
            try:
                from sglang_spectrum.sglang_plugin.compat import cpu_server_flags

                flags += cpu_server_flags(mode)
            except Exception:
                pass
            return flags
        flags = list(GPU_FLAGS) + ["--mem-fraction-static", f"{mem:g}"]
        return flags + (["--base-gpu-id", str(gpu)] if gpu else [])

    # -------------------------------------------------------------- deployments

    def server(
        self,
        tag: str,
        model: str,
        mode: str,
        mem: float,
        gpu: int,
        extra: list[str],
        stats,
        tp: int = 1,
    ) -> tuple[Proc, str]:
        port = free_port()
        cmd = [PY, "-m", "sglang.launch_server", "--model-path", model]
        cmd += ["--host", HOST, "--port", str(port), "--log-level", "warning"]
        cmd += self.device_flags(mode, mem, gpu) + extra
        cmd += ["--tp-size", str(tp)] if tp > 1 else []
        name = f"{tag}-{mode}"
        p = Proc(name, cmd, self.logs / f"{name}.log", self.env(stats))
        return p, f"http://{HOST}:{port}"

    def launch_single(
        self, tag: str, model: str, mem: float, extra: list[str], tp: int = 1
    ) -> tuple:
        p, url = self.server(tag, model, "single", mem, 0, extra, None, tp)
        dep = Deployment(tag, [p.start()], url)
        self.live.append(dep)
        return dep, [(p, url + "/health")]

    def launch_pair(
        self,
        tag: str,
        model: str,
        backend: str,
        budget: float | None,
        key_scales: str | None,
        mem: tuple[float, float],
        extra: list[str],
        tiers: str | None = None,
        tp: int = 1,
    ) -> tuple:
        """A PD pair and its proxy; ``tp`` > 1: both servers over GPUs 0..tp-1."""
        stats = self.work / f"{tag}.stats.jsonl"
        stats.unlink(missing_ok=True)
        boot = free_port()
        common = ["--disaggregation-transfer-backend", backend] + extra
        if backend == "spectrum":
            if tiers:
                common += ["--spectrum-tiers", tiers]
            if budget is not None:
                common += ["--spectrum-budget", f"{budget:g}"]
            if key_scales:
                common += ["--spectrum-key-scales", key_scales]
        pre, pre_url = self.server(
            tag,
            model,
            "prefill",
            mem[0],
            0,
            ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot)]
            + common,
            stats,
            tp,
        )
        dec, dec_url = self.server(
            tag,
            model,
            "decode",
            mem[1],
            1 if self.split() and tp == 1 else 0,
            ["--disaggregation-mode", "decode"] + common,
            stats,
            tp,
        )
        port = free_port()
        proxy_cmd = [PY, str(HERE / "pd_proxy.py"), "--prefill", pre_url, str(boot)]
        proxy_cmd += ["--decode", dec_url, "--port", str(port)]
        proxy = Proc(f"{tag}-proxy", proxy_cmd, self.logs / f"{tag}-proxy.log", self.env(None))
        dep = Deployment(tag, [pre.start(), dec.start()], f"http://{HOST}:{port}", stats)
        dep.procs.append(proxy.start())
        self.live.append(dep)
        targets = [(pre, pre_url + "/health"), (dec, dec_url + "/health")]
        return dep, targets + [(proxy, dep.url + "/health")]

    def wait(self, deps_targets: list[tuple], limit_s: float) -> None:
        t0 = time.monotonic()
        targets = [t for _, ts in deps_targets for t in ts]
        wait_ready(targets, min(limit_s, max(10.0, self.remaining() - 30)))
        for dep, _ in deps_targets:
            dep.startup_s = time.monotonic() - t0
        log(f"ready in {time.monotonic() - t0:.0f} s: {', '.join(d.tag for d, _ in deps_targets)}")

    def stop(self, dep: Deployment) -> None:
        dep.stop()
        if dep in self.live:
            self.live.remove(dep)

    def stop_all(self) -> None:
        stop_all([p for d in self.live for p in d.procs])
        self.live.clear()

    # -------------------------------------------------------------- correctness

    def phase_correct(self) -> None:
        a = self.args
        if self.state.get("correct") and not a.redo:
            log("correct: done before (state); --redo to run again")
            return
        if self.remaining() < 240:
            log(f"correct: skipped, {self.remaining():.0f} s left")
            return
        model = a.smollm or str(
            Path(os.environ.get("SPECTRUM_CACHE_DIR", "/tmp/spc"), "models", "smollm2-135m")
        )
        if not Path(model, "config.json").is_file():
            log(f"correct: no model folder {model} (run scripts/gpu_setup.sh with every parcel)")
            return
        m = a.mem_small
        split = self.split()
        # several servers share a GPU and start at once: a static fraction each would see the
        # others' memory as used; a high fraction with a token cap sizes every pool alike
        cap = ["--max-total-tokens", str(a.small_max_tokens)] if a.small_max_tokens else []
        # chunks shorter than the secret prompts: the PD pairs send them in parts
        cap += ["--chunked-prefill-size", str(a.correct_chunked_prefill)]
        deps = [self.launch_single("single", model, m, cap)]
        budgets = [1.0] + [b for b in a.correct_budgets if b != 1.0]
        for b in budgets:
            mem = (m, m if split and not cap else m) if cap else (m, 0.4 if split else m)
            deps.append(
                self.launch_pair(f"pd-b{b:g}", model, "spectrum", b, a.key_scales, mem, cap)
            )
        result: dict = {
            "model": model,
            "hardware": self.hardware(),
            "budgets": budgets,
            "chunked_prefill_size": a.correct_chunked_prefill,
        }
        try:
            self.wait(deps, a.startup_timeout_s)
            single = deps[0][0]
            pairs = {b: d for b, (d, _) in zip(budgets, deps[1:])}
            prompts = [{"text": t, "max_new_tokens": 32} for t in GREEDY_PROMPTS]
            secrets = self.secret_prompts(model, a.secret_tokens, a.secret_trials)
            prompts += [{"text": s["text"], "max_new_tokens": 12, "secret": s} for s in secrets]
            rows = []
            for i, p in enumerate(prompts):
                body = {
                    "text": p["text"],
                    "sampling_params": {"temperature": 0, "max_new_tokens": p["max_new_tokens"]},
                }
                row = {"prompt": i, "secret": p.get("secret", {}).get("passcode")}
                for name, dep in [("single", single)] + [(f"b{b:g}", d) for b, d in pairs.items()]:
                    st, data = http(dep.url + "/generate", body, timeout=a.request_timeout_s)
                    try:
                        j = json.loads(data)
                        row[name] = j["text"]
                        row[f"{name}_prompt_tokens"] = j.get("meta_info", {}).get("prompt_tokens")
                    except (ValueError, KeyError, TypeError):
                        row[name] = None
                        row[f"{name}_error"] = f"{st} {data[:300]!r}"
                rows.append(row)
                log(f"prompt {i}: " + " | ".join(f"{k}={row.get(k)!r:.60}" for k in row))
            result["rows"] = rows
            greedy_ok = all(r["single"] is not None and r["single"] == r["b1"] for r in rows)
            result["b1_identical_to_single"] = greedy_ok
            s = [r for r in rows if r["secret"]]
            for b in budgets:
                result[f"secret_b{b:g}"] = [
                    bool(r[f"b{b:g}"]) and r["secret"] in r[f"b{b:g}"] for r in s
                ]
            result["secret_single"] = [bool(r["single"]) and r["secret"] in r["single"] for r in s]
            stats = {}
            for b, d in pairs.items():
                stats[f"b{b:g}"] = read_jsonl(d.stats_path)
            result["stats"] = stats
            result["paths"] = {
                k: sorted({str(r.get("path")) for r in v if r.get("role") == "prefill"})
                for k, v in stats.items()
            }
            result["parts"] = {
                k: sorted({r.get("parts") for r in v if r.get("role") == "prefill"})
                for k, v in stats.items()
            }
            log(
                f"correct: b=1.0 identical to single: {greedy_ok}; secrets single "
                f"{result['secret_single']}, "
                + ", ".join(f"b={b:g} {result[f'secret_b{b:g}']}" for b in budgets)
                + f"; prefill paths {result['paths']}"
            )
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
            log(f"correct: FAILED: {result['error'][:3000]}")
        finally:
            stop_all([p for d, _ in deps for p in d.procs])
            for d, _ in deps:
                self.stop(d)
        self.state["correct"] = result
        self.save()

    def secret_prompts(self, model: str, tokens: int, trials: int) -> list[dict]:
        """Passcode stated at the start of a ~``tokens``-token WikiText text, asked at the end."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        text = WIKITEXT.read_text()
        rng = random.Random(12)
        out = []
        for _ in range(trials):
            code = str(rng.randrange(1_000_000, 10_000_000))
            head = f"Remember this: the passcode is {code}.\n\n"
            start = rng.randrange(0, max(1, len(text) // 3))
            words = text[start:].split(" ")
            lo, hi = 16, len(words)
            while lo < hi:  # most words that keep the prompt within `tokens`
                mid = (lo + hi + 1) // 2
                n = len(tok(self._chat(tok, head, " ".join(words[:mid]))).input_ids)
                lo, hi = (mid, hi) if n <= tokens else (lo, mid - 1)
            prompt = self._chat(tok, head, " ".join(words[:lo]))
            out.append({"text": prompt, "passcode": code, "tokens": len(tok(prompt).input_ids)})
        return out

    @staticmethod
    def _chat(tok, head: str, hay: str) -> str:
        content = head + hay + "\n\n" + QUESTION
        msgs = [{"role": "user", "content": content}]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception:
            text = content + "\n"
        return text + ANSWER_PREFIX

    # -------------------------------------------------------------- speed

    def configs(self) -> list[tuple[str, float | None, str | None]]:
        out = []
        for c in self.args.configs:
            parts = c.split(":")
            backend = parts[0]
            budget = float(parts[1]) if len(parts) > 1 and parts[1] else None
            ks = parts[2] if len(parts) > 2 and parts[2] else self.args.key_scales
            if backend != "spectrum":
                budget, ks = None, None
            out.append((backend, budget, ks))
        return out

    @staticmethod
    def point_key(backend: str, budget, ks, L: int, C: int, tp: int = 1) -> str:
        return f"{backend}|{budget}|{ks}|{L}|{C}" + (f"|tp{tp}" if tp > 1 else "")

    def est_s(self, L: int, C: int) -> float:
        """Seconds a point will take: measured seconds per request at this length, else a
        guess (8B prefill + a 16-bit KV over TCP)."""
        per = self.state["sec_per_req"].get(str(L))
        if per is None:
            per = 0.3 + 0.6 * L / 4096 if not self.args.cpu else 2.0 + 8.0 * L / 4096
        n = self.args.num_prompts + 1
        return 10 + per * n / max(1, min(C, 4) ** 0.5)

    def phase_speed(self) -> None:
        a = self.args
        model = a.model8b
        if not Path(model, "config.json").is_file():
            log(f"speed: no model folder {model} (bench/gpu_model.py {model})")
            return
        done = {self.point_key(*r["_key"]) for r in self.state["records"] if "_key" in r}
        todo = {}
        for backend, budget, ks in self.configs():
            points = [
                (L, C)
                for L in a.lengths
                for C in a.concurrency
                if self.point_key(backend, budget, ks, L, C) not in done
            ]
            if points:
                todo[(backend, budget, ks)] = points
        extra = ["--load-format", "dummy", "--chunked-prefill-size", str(a.chunked_prefill)]
        if a.together:  # every pair at once: one start for all (token caps size the pools)
            if self.remaining() < a.startup_budget_s + 60:
                log(f"speed: {self.remaining():.0f} s left: stop here (resume)")
                return
            mem = (a.mem_big_split, a.mem_big_split)
            extra += ["--max-total-tokens", str(a.big_max_tokens)]
            deps = {
                cfg: self.launch_pair(
                    self.speed_tag(*cfg), model, *cfg, mem, extra, a.speed_tiers or None
                )
                for cfg in todo
            }
            try:
                self.wait(list(deps.values()), a.startup_timeout_s)
                for cfg, (dep, _) in deps.items():
                    self.run_points(dep, cfg, todo[cfg])
            finally:
                for dep, _ in deps.values():
                    self.stop(dep)
            return
        mem = (a.mem_big, a.mem_big) if not self.split() else (a.mem_big_split, a.mem_big_split)
        for cfg, points in todo.items():
            need = a.startup_budget_s + self.est_s(*points[0])
            if self.remaining() < need:
                log(f"speed: {self.remaining():.0f} s left < {need:.0f} s: stop here (resume)")
                return
            dep, targets = self.launch_pair(
                self.speed_tag(*cfg), model, *cfg, mem, extra, a.speed_tiers or None
            )
            try:
                self.wait([(dep, targets)], a.startup_timeout_s)
                self.run_points(dep, cfg, points)
            finally:
                self.stop(dep)

    @staticmethod
    def speed_tag(backend: str, budget: float | None, ks: str | None, tp: int = 1) -> str:
        tag = f"speed-{backend}" + (f"-b{budget:g}" if budget is not None else "")
        return tag + (f"-tp{tp}" if tp > 1 else "")

    def run_points(self, dep: Deployment, cfg: tuple, points: list, tp: int = 1) -> None:
        """Warm ``dep`` up, then one bench_serving run per (length, concurrency) point."""
        try:
            self.warm_up(dep)
            for L, C in points:
                if self.remaining() < self.est_s(L, C) + 15:
                    log(f"speed: {self.remaining():.0f} s left: {dep.tag} L={L} C={C} next call")
                    return
                rec = self.run_point(dep, *cfg, L, C, tp)
                if rec is not None:
                    self.state["records"].append(rec)
                    self.save()
                dead = [p for p in dep.procs if not p.alive()]
                if dead:
                    raise RuntimeError(f"{dead[0].name} died:\n{dead[0].tail()}")
        except Exception as e:
            log(f"speed: {dep.tag} FAILED: {type(e).__name__}: {str(e)[:3000]}")
            self.state.setdefault("errors", []).append(f"{dep.tag}: {type(e).__name__}: {e}"[:2000])
            self.save()

    # -------------------------------------------------------------- tensor parallelism

    def phase_tp(self) -> None:
        """TP 2 on two GPUs: a single server and PD pairs (spectrum b=1.0, b=0.5,
        mooncake) of the 8B-shaped model (seeded dummy weights: every TP-2 server holds
        the same shards), all at once. Greedy outputs of short text prompts and of
        3000/12000-token id prompts (12000 > the chunk: sent in parts) from each pair
        against the single server; what each rank sent; then the --tp-points."""
        a = self.args
        if self.state.get("tp") and not a.redo:
            log("tp: done before (state); --redo to run again")
            return
        if self.gpus < 2 or a.cpu:
            log(f"tp: needs 2 GPUs, {self.gpus} here: skipped")
            return
        tp, model = 2, a.model8b
        mem = (a.mem_big_split, a.mem_big_split)
        extra = ["--load-format", "dummy", "--chunked-prefill-size", str(a.chunked_prefill)]
        extra += ["--max-total-tokens", str(a.big_max_tokens)]
        deps = [self.launch_single("tp-single", model, mem[0], extra, tp)]
        cfgs = [("spectrum", 1.0, a.key_scales), ("spectrum", 0.5, a.key_scales)]
        cfgs.append(("mooncake", None, None))
        for cfg in cfgs:
            tag = self.speed_tag(*cfg, tp)
            deps.append(self.launch_pair(tag, model, *cfg, mem, extra, a.speed_tiers or None, tp))
        hw = f"{self.gpu_name} x{self.gpus}; TP {tp}: prefill and decode each on GPUs 0-1"
        result: dict = {"tp": tp, "hardware": hw + "; Mooncake TCP loopback (MC_FORCE_TCP=1)"}
        result["model"] = "Llama-3-8B-shaped (bench/gpu_model.py), --load-format dummy"
        try:
            self.wait(deps, a.startup_timeout_s)
            names = ["single", "b1", "b0.5", "mooncake"]
            by_name = {n: d for n, (d, _) in zip(names, deps)}
            rng = random.Random(7)
            prompts = [{"text": t} for t in GREEDY_PROMPTS]
            prompts += [
                {"input_ids": [rng.randrange(300, 120000) for _ in range(n)]} for n in (3000, 12000)
            ]
            rows = []
            for i, p in enumerate(prompts):
                body = dict(p, sampling_params={"temperature": 0, "max_new_tokens": 16})
                row: dict = {"prompt": i}
                for name, dep in by_name.items():
                    st, data = http(dep.url + "/generate", body, timeout=a.request_timeout_s)
                    try:
                        j = json.loads(data)
                        row[name] = j.get("output_ids") or j["text"]
                        row["prompt_tokens"] = j.get("meta_info", {}).get("prompt_tokens")
                    except (ValueError, KeyError, TypeError):
                        row[name] = None
                        row[f"{name}_error"] = f"{st} {data[:300]!r}"
                rows.append(row)
                log(
                    f"tp prompt {i} ({row.get('prompt_tokens')} tokens): "
                    + ", ".join(
                        f"{n}={'same' if row[n] == row['single'] else row[n]!r:.40}"
                        for n in names[1:]
                    )
                )
            result["rows"] = rows
            for n in names[1:]:
                result[f"{n}_identical_to_single"] = all(
                    r["single"] is not None and r[n] == r["single"] for r in rows
                )
            result["per_rank"] = {
                n: per_rank(read_jsonl(by_name[n].stats_path)) for n in ("b1", "b0.5")
            }
            log(
                "tp: identical to single: "
                + ", ".join(f"{n} {result[f'{n}_identical_to_single']}" for n in names[1:])
                + f"; per rank {result['per_rank']}"
            )
            self.state["tp"] = result
            self.save()
            for L, C in a.tp_points:
                for cfg, n in ((cfgs[2], "mooncake"), (cfgs[1], "b0.5")):
                    self.run_points(by_name[n], cfg, [(L, C)], tp)
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
            log(f"tp: FAILED: {result['error'][:3000]}")
        finally:
            for d, _ in deps:
                self.stop(d)
        self.state["tp"] = result
        self.save()

    def warm_up(self, dep: Deployment) -> None:
        """One small request through the proxy (JIT-compiles FlashInfer's kernels the
        first time on a machine), with the time it took."""
        t = time.monotonic()
        ids = [random.randrange(300, 120000) for _ in range(256)]
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
        st, data = http(dep.url + "/generate", body, timeout=max(30, self.remaining() - 30))
        if st != 200:
            raise RuntimeError(f"warm-up request failed: {st} {data[:500]!r}")
        log(f"{dep.tag}: warm-up request {time.monotonic() - t:.1f} s")

    def run_point(self, dep, backend, budget, ks, L: int, C: int, tp: int = 1) -> dict | None:
        a = self.args
        if dep.stats_path is not None:
            dep.stats_path.write_text("")
        out_file = self.work / f"bench_{dep.tag}_{L}_{C}.jsonl"
        out_file.unlink(missing_ok=True)
        cmd = [PY, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", dep.url]
        cmd += ["--model", a.model8b, "--tokenizer", a.model8b, "--dataset-name", "random-ids"]
        cmd += ["--random-input-len", str(L), "--random-output-len", str(a.output_len)]
        cmd += ["--random-range-ratio", "1.0", "--num-prompts", str(a.num_prompts)]
        cmd += ["--max-concurrency", str(C), "--tokenize-prompt", "--flush-cache"]
        cmd += ["--seed", str(1000 + L + C), "--output-file", str(out_file), "--disable-tqdm"]
        t = time.monotonic()
        blog = self.logs / f"bench_{dep.tag}_{L}_{C}.log"
        with open(blog, "wb") as fh:
            try:
                rc = subprocess.run(
                    cmd,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=max(20, self.remaining() - 10),
                    env=self.env(None),
                    cwd=self.work,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        dur = time.monotonic() - t
        try:
            res = json.loads(out_file.read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            tail = blog.read_text(errors="replace")[-2500:] if blog.exists() else ""
            log(f"{dep.tag} L={L} C={C}: bench_serving rc={rc}, no result:\n{tail}")
            return None
        done_n = int(res.get("completed") or 0)
        if done_n == 0:
            tail = blog.read_text(errors="replace")[-1500:]
            log(f"{dep.tag} L={L} C={C}: no request completed (not recorded):\n{tail}")
            return None
        if not res.get("median_ttft_ms"):  # bench_serving counts failed requests too
            tail = blog.read_text(errors="replace")[-1500:]
            log(f"{dep.tag} L={L} C={C}: requests failed (no TTFT; not recorded):\n{tail}")
            return None
        if done_n < a.num_prompts:
            log(f"{dep.tag} L={L} C={C}: only {done_n} of {a.num_prompts} requests completed")
        self.state["sec_per_req"][str(L)] = dur / (a.num_prompts + 1) * max(1, min(C, 4)) ** 0.5
        rec = self.record(backend, budget, ks, L, C, res, read_jsonl(dep.stats_path), tp)
        rec["bench_s"] = round(dur, 1)
        log(
            f"{dep.tag} L={L} C={C}: ttft p50 {rec['ttft_p50_ms']:.0f} ms mean "
            f"{rec['ttft_mean_ms']:.0f} p99 {rec['ttft_p99_ms']:.0f}, "
            f"{rec['req_per_s']:.2f} req/s, "
            f"{rec['bytes_per_req'] / 2**20:.0f} MiB/req, pack {rec['pack_ms']} transfer "
            f"{rec['transfer_ms']} unpack {rec['unpack_ms']} ms, link {rec['link_gbps']} Gb/s "
            f"({dur:.0f} s)"
        )
        return rec

    def record(self, backend, budget, ks, L, C, res: dict, stats: list[dict], tp: int = 1) -> dict:
        """One point's record; with ``tp`` > 1 every rank writes a stats line per request
        (bytes per request: all ranks; times: medians over ranks and requests)."""
        cfg = json.loads(Path(self.args.model8b, "config.json").read_text())
        full = L * 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
        pre = [r for r in stats if r.get("role") == "prefill"]
        dec = [r for r in stats if r.get("role") == "decode"]
        keep = self.args.num_prompts * tp
        if len(pre) > keep:  # the bench's warm-up request came first
            warm = {r.get("room") for r in pre[: len(pre) - keep]}
            pre = pre[len(pre) - keep :]
            dec = [r for r in dec if r.get("room") not in warm]

        def med(rows, k):
            v = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            return round(statistics.median(v), 3) if v else None

        sent = [float(r["sent_bytes"]) * tp for r in pre if "sent_bytes" in r]
        rates = [
            r["sent_bytes"] * 8 / (r["transfer_ms"] * 1e6)
            for r in pre
            if r.get("transfer_ms") and r.get("sent_bytes")
        ]
        key_scales = ks
        if pre and pre[0].get("key_scales"):
            key_scales = pre[0]["key_scales"]
        rec = {
            "backend": backend,
            "budget": budget if backend == "spectrum" else 1.0,
            "key_scales": key_scales if backend == "spectrum" else None,
            "tier_mode": pre[0].get("tier_mode") if pre else None,
            "input_len": L,
            "concurrency": C,
            "ttft_mean_ms": res.get("mean_ttft_ms"),
            "ttft_p50_ms": res.get("median_ttft_ms"),
            "ttft_p99_ms": res.get("p99_ttft_ms"),
            "req_per_s": res.get("request_throughput"),
            "bytes_per_req": round(statistics.mean(sent)) if sent else full,
            "pack_ms": med(pre, "pack_ms"),
            "transfer_ms": med(pre, "transfer_ms"),
            "unpack_ms": med(dec, "unpack_ms"),
            "link_gbps": round(statistics.median(rates), 2) if rates else None,
            "hardware": self.hardware(tp),
            "full_bytes_per_req": full,
            "num_prompts": self.args.num_prompts,
            "completed": res.get("completed"),
            "output_len": self.args.output_len,
            "chunked_prefill_size": self.args.chunked_prefill,
            "prefill_chunks": math.ceil(L / self.args.chunked_prefill),
            "mean_e2e_ms": res.get("mean_e2e_latency_ms"),
            "paths": sorted({str(r.get("path")) for r in pre}) if pre else None,
            "queue_ms": med(pre, "queue_ms"),
            "parts": med(pre, "parts"),
            "last_pack_ms": med(pre, "last_pack_ms"),
            "last_transfer_ms": med(pre, "last_transfer_ms"),
            "tp": tp,
            "stats_records": {"prefill": len(pre), "decode": len(dec)},
            "_key": [backend, budget, ks, L, C, tp],
        }
        return rec

    # -------------------------------------------------------------- report

    def write_outputs(self) -> None:
        recs = [{k: v for k, v in r.items() if k != "_key"} for r in self.state["records"]]
        (self.out / "serving_gpu.json").write_text(json.dumps(recs, indent=1) + "\n")
        if self.state.get("correct"):
            (self.out / "serving_gpu_correct.json").write_text(
                json.dumps(self.state["correct"], indent=1) + "\n"
            )
        if self.state.get("tp"):
            (self.out / "serving_gpu_tp.json").write_text(
                json.dumps(self.state["tp"], indent=1) + "\n"
            )
        (self.out / "serving_gpu.md").write_text(
            markdown(recs, self.state.get("correct"), self.state.get("tp"))
        )

    def phase_report(self) -> None:
        self.write_outputs()
        recs = [r for r in self.state["records"]]
        if recs:
            try:
                plot(recs, self.out / "serving_gpu.png")
            except Exception as e:
                log(f"report: no plot ({type(e).__name__}: {e})")
        with tarfile.open(self.out / "serving_gpu_logs.tgz", "w:gz") as tf:
            for f in sorted(self.logs.glob("*.log")):
                data = f.read_bytes()[-200_000:]
                info = tarfile.TarInfo(f.name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        print(summary(recs, self.state.get("correct")), flush=True)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda f: lambda s: [f(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--phases", type=csv(str), default=["correct", "speed", "report"])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/serving_gpu/out"))
    ap.add_argument("--work-dir", default="/tmp/serving_gpu")
    ap.add_argument("--state", default="/tmp/serving_gpu/state.json")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="stop and write by then")
    ap.add_argument("--redo", action="store_true", help="run the correctness phase again")
    ap.add_argument("--smollm", default=None, help="SmolLM2 folder (default $SPECTRUM_CACHE_DIR)")
    ap.add_argument("--model8b", default="/tmp/model8b")
    ap.add_argument(
        "--configs", type=csv(str), default=["mooncake", "spectrum:0.5", "spectrum:0.3"]
    )
    ap.add_argument("--key-scales", default=None, help="--spectrum-key-scales (default: server's)")
    ap.add_argument("--lengths", type=csv(int), default=[4096, 16384])
    ap.add_argument("--concurrency", type=csv(int), default=[1, 4])
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--chunked-prefill", type=int, default=CHUNKED_PREFILL)
    ap.add_argument(
        "--speed-tiers",
        default="3",
        help="--spectrum-tiers for the dummy-weight speed servers (the INT4 probe means "
        "nothing on random weights and falls back to 2 tiers); '' = server default",
    )
    ap.add_argument(
        "--together", action="store_true", help="speed: start every pair at once (token caps)"
    )
    ap.add_argument(
        "--big-max-tokens", type=int, default=81920, help="KV cap of 8B servers started together"
    )
    ap.add_argument(
        "--tp-points",
        type=lambda s: [tuple(int(v) for v in p.split("x")) for p in s.split(",") if p],
        default=[(16384, 1)],
        help="tp phase: LENxCONC points for mooncake and spectrum b=0.5 at TP 2",
    )
    ap.add_argument(
        "--correct-chunked-prefill",
        type=int,
        default=1024,
        help="correct phase: --chunked-prefill-size (below the secret prompts: parts)",
    )
    ap.add_argument("--correct-budgets", type=csv(float), default=[1.0, 0.5])
    ap.add_argument("--secret-tokens", type=int, default=2500)
    ap.add_argument("--secret-trials", type=int, default=3)
    ap.add_argument("--mem-small", type=float, default=0.85, help="SmolLM2 servers")
    ap.add_argument(
        "--small-max-tokens", type=int, default=131072, help="KV cap of each SmolLM2 server"
    )
    ap.add_argument("--mem-big", type=float, default=0.4, help="8B servers sharing one GPU")
    ap.add_argument("--mem-big-split", type=float, default=0.85, help="8B servers, own GPU")
    ap.add_argument("--one-gpu", action="store_true", help="share GPU 0 even with more GPUs")
    ap.add_argument("--startup-timeout-s", type=float, default=420.0)
    ap.add_argument("--startup-budget-s", type=float, default=100.0, help="time a pair start needs")
    ap.add_argument("--request-timeout-s", type=float, default=300.0)
    ap.add_argument("--cpu", action="store_true", help="CPU-only SGLang (checking the script)")
    ap.add_argument("--cpu-max-tokens", type=int, default=16384)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    r = Runner(args)
    log(
        f"{r.hardware()}; phases {args.phases}; deadline {args.deadline_s:.0f} s; "
        f"state {args.state} ({len(r.state['records'])} records, correct "
        f"{'done' if r.state.get('correct') else 'not done'})"
    )
    if args.dry_run:
        done = {r.point_key(*x["_key"]) for x in r.state["records"] if "_key" in x}
        for backend, budget, ks in r.configs():
            for L in args.lengths:
                for C in args.concurrency:
                    k = r.point_key(backend, budget, ks, L, C)
                    print(
                        f"  speed {k}: {'done' if k in done else 'todo'} (~{r.est_s(L, C):.0f} s)"
                    )
        p, url = r.server("x", args.model8b, "prefill", args.mem_big, 0, ["..."], None)
        print("  server command:", shlex.join(p.cmd))
        return 0
    rc = 0
    try:
        if "correct" in args.phases:
            r.phase_correct()
        if "tp" in args.phases:
            r.phase_tp()
        if "speed" in args.phases:
            r.phase_speed()
    except KeyboardInterrupt:
        rc = 130
    finally:
        r.stop_all()
        r.phase_report() if "report" in args.phases else r.write_outputs()
    return rc


if __name__ == "__main__":
    sys.exit(main())
