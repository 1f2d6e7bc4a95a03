"""Phases of bench/serving_gpu.py (correct, speed, tp, report) on one warm machine: the
:class:`Runner` keeps the state, the deadline and the servers it started."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import tarfile
import time
from pathlib import Path

import serving_gpu_configs as configs  # loaded by serving_gpu.py (bench/ is off sys.path)
import serving_gpu_records as records
import serving_gpu_report as report
import serving_procs as procs
from serving_gpu_bench import BenchClient
from serving_procs import Deployment, http, log

GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "List three prime numbers:",
    "def fibonacci(n):",
]
QUESTION = "What is the passcode stated at the beginning of the text? Answer with the number only."
ANSWER_PREFIX = "The passcode is"


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work_dir)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = records.State(Path(args.state))
        self.deadline = procs.T_START + args.deadline_s
        self.gpus, self.gpu_name, gpu_gib = self._gpus()
        split = self.gpus >= 2 and not args.one_gpu
        self.fit = configs.pairs_that_fit(gpu_gib, split)
        self.launcher = procs.Launcher(self.work, args.cpu, split, args.cpu_max_tokens)
        self.configs = configs.parse_configs(args.configs, args.key_scales, args.min_budget)
        per_point = 6.0 if args.bench_mode == "worker" else 22.0
        self.est = configs.Estimates(self.state.data, args.num_prompts, args.cpu, per_point)
        self.bench = BenchClient(
            procs.PY,
            self.launcher.env(),
            self.work,
            self.launcher.logs / "bench_worker.log",
            args.bench_mode,
        )

    # -------------------------------------------------------------- machine and state

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _gpus(self) -> tuple[int, str, float | None]:
        """(visible GPUs, the first one's name, its memory in GiB or None)."""
        if self.args.cpu:
            return 0, "cpu", None
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.split("\n")
            rows = [[f.strip() for f in line.rsplit(",", 1)] for line in out if line.strip()]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            n = len(visible.split(",")) if visible else len(rows)
            if not rows:
                return n, "unknown GPU", None
            mib = rows[0][1] if len(rows[0]) == 2 and rows[0][1].isdigit() else ""
            return n, rows[0][0], int(mib) / 1024 if mib else None
        except (OSError, subprocess.SubprocessError):
            return 1, "unknown GPU", None

    def group_size(self, todo: dict) -> int:
        """Pairs started together: ``--group-size`` (all with ``--together``), capped by
        what the GPU's memory holds (:func:`configs.pairs_that_fit`)."""
        size = len(todo) if self.args.together else self.args.group_size
        return size if self.fit is None else min(size, self.fit)

    def hardware(self, tp: int = 1) -> str:
        if self.args.cpu:
            return f"CPU ({os.cpu_count()} cores)"
        where = (
            "prefill GPU 0 -> decode GPU 1"
            if self.launcher.split
            else "prefill and decode on 1 GPU"
        )
        if tp > 1:
            where = f"TP {tp}: prefill and decode each on GPUs 0-{tp - 1}"
        return f"{self.gpu_name} x{self.gpus}; {where}"

    def save(self) -> None:
        self.state.save()
        self.write_outputs()

    def near_deadline(self) -> bool:
        """A timeout now may be the deadline's doing, not the server's."""
        return self.remaining() < 60

    def fail(self, key: str, error: str) -> None:
        """Remember a failed config or point: later calls skip it (--retry-failed)."""
        self.state["failed"][key] = error[:2000]
        self.save()

    def skipped(self, key: str) -> bool:
        return key in self.state["failed"] and not self.args.retry_failed

    def close(self) -> None:
        self.bench.close()
        self.launcher.stop_all()

    # -------------------------------------------------------------- correctness

    def correct_plan(self) -> tuple[dict[str, str], list[tuple[str, configs.Config, str | None]]]:
        """Singles (name -> KV dtype) and pairs (name, config, the single whose greedy
        outputs they must equal, or None: passcode only)."""
        a = self.args
        pairs = []
        for b in [1.0] + [b for b in a.correct_budgets if b != 1.0]:
            pairs.append(
                (
                    f"b{b:g}",
                    configs.Config("spectrum", b, a.key_scales),
                    "single" if b == 1.0 else None,
                )
            )
        for b in a.correct_fp8_budgets:  # b >= 0.5 sends the FP8 pool's bytes: lossless
            ref = "single-fp8" if b >= 0.5 else None
            pairs.append((f"fp8-b{b:g}", configs.Config("spectrum-fp8", b, a.key_scales), ref))
        if a.correct_fp8_budgets:
            # the control: does stock PD with FP8 KV answer like a single FP8 server? (on
            # 2026-12-03 spectrum-fp8 b=0.5, byte-exact on the wire, drifted on 1 of 7)
            pairs.append(("mooncake-fp8", configs.Config("mooncake-fp8"), "single-fp8"))
        for b in a.correct_asym_budgets:
            pairs.append((f"asym-b{b:g}", configs.Config("spectrum-asym", b, a.key_scales), None))
        singles = {"single": configs.BF16}
        if a.correct_fp8_budgets:
            singles["single-fp8"] = configs.FP8
        return singles, pairs

    def smollm(self) -> str | None:
        model = self.args.smollm or str(
            Path(os.environ.get("SPECTRUM_CACHE_DIR", "/tmp/spc"), "models", "smollm2-135m")
        )
        return model if Path(model, "config.json").is_file() else None

    def small_model_for(self, phase: str) -> str | None:
        """SmolLM2's folder when ``phase`` is still to run (not in the state, or --redo)
        and the model is here; else None, logged."""
        if self.state.get(phase) and not self.args.redo:
            log(f"{phase}: done before (state); --redo to run again")
            return None
        model = self.smollm()
        if model is None:
            log(f"{phase}: no SmolLM2 model folder (run scripts/gpu_setup.sh with every parcel)")
        return model

    def phase_result(self, model: str, **fields) -> dict:
        """The record a SmolLM2 phase keeps in the state: model, hardware, ``fields``."""
        return {"model": model, "hardware": self.hardware(), **fields}

    def correct_todo(self) -> bool:
        """The correct phase has not run (or --redo) and its model is here."""
        return (not self.state.get("correct") or self.args.redo) and self.smollm() is not None

    @contextlib.contextmanager
    def _phase(self, name: str, deps: dict, result: dict):
        """Run a phase's body: a failure is recorded in ``result`` (not raised), the
        deployments are stopped, the result is kept in the state either way."""
        try:
            yield
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
            log(f"{name}: FAILED: {result['error'][:3000]}")
        finally:
            self.launcher.stop(list(deps.values()))
        self.state[name] = result
        self.save()

    def _ask_all(self, deps: dict, body: dict, row: dict, answer) -> None:
        """Post ``body`` to every deployment; ``row[name]`` = ``answer(json)`` or None
        with ``row[name + "_error"]``."""
        for name, dep in deps.items():
            st, data = http(dep.url + "/generate", body, timeout=self.args.request_timeout_s)
            try:
                row[name] = answer(json.loads(data), row)
            except (ValueError, KeyError, TypeError):
                row[name] = None
                row[f"{name}_error"] = f"{st} {data[:300]!r}"

    def phase_correct(self) -> None:
        a = self.args
        model = self.small_model_for("correct")
        if model is None:
            return
        if self.remaining() < a.correct_budget_s:
            log(f"correct: skipped, {self.remaining():.0f} s left < {a.correct_budget_s:.0f} s")
            return
        m, tokens = a.mem_small, a.small_max_tokens or None
        # several servers share a GPU and start at once: a static fraction each would see the
        # others' memory as used; a high fraction with a token cap sizes every pool alike.
        # Chunks shorter than the secret prompts: the PD pairs send them in parts.
        extra = ["--chunked-prefill-size", str(a.correct_chunked_prefill)]
        singles, pairs = self.correct_plan()
        deps: dict[str, Deployment] = {}
        for name, dtype in singles.items():
            deps[name] = self.launcher.single(name, model, m, extra, dtype, bf16_tokens=tokens)
        for name, cfg, _ in pairs:
            deps[name] = self.launcher.pair(
                f"pd-{name}", model, cfg, (m, m), extra, bf16_tokens=tokens
            )
        result = self.phase_result(
            model,
            chunked_prefill_size=a.correct_chunked_prefill,
            pairs={name: {"config": cfg.name, "reference": ref} for name, cfg, ref in pairs},
        )
        with self._phase("correct", deps, result):
            took = self.launcher.wait(list(deps.values()), self.start_limit())
            log(f"correct: {len(deps)} deployments ready in {took:.0f} s")
            result["max_total_tokens"] = {n: d.max_tokens for n, d in deps.items()}

            def answer(j: dict, row: dict) -> str:
                row["prompt_tokens"] = j.get("meta_info", {}).get("prompt_tokens")
                return j["text"]

            rows = self.ask_prompts(deps, model, GREEDY_PROMPTS, 32, answer)
            for row in rows:
                cells = " | ".join(f"{k}={v!r:.60}" for k, v in row.items())
                log(f"prompt {row['prompt']}: {cells}")
            result["rows"] = rows
            result["identical"] = {
                name: all(r[ref] is not None and r[name] == r[ref] for r in rows)
                for name, _, ref in pairs
                if ref
            }
            s = [r for r in rows if r["secret"]]
            result["secret"] = {
                name: [bool(r[name]) and r["secret"] in r[name] for r in s] for name in deps
            }
            stats = {name: report.read_jsonl(deps[name].stats_path) for name, _, _ in pairs}
            result["stats"] = stats
            pre = {k: [r for r in v if r.get("role") == "prefill"] for k, v in stats.items()}
            result["paths"] = {k: sorted({str(r.get("path")) for r in v}) for k, v in pre.items()}
            result["parts"] = {k: sorted({r.get("parts") for r in v}) for k, v in pre.items()}
            log(
                f"correct: identical {result['identical']}; secrets {result['secret']}; "
                f"prefill paths {result['paths']}"
            )

    def ask_prompts(
        self, deps: dict, model: str, texts: list[str], max_new_tokens: int, answer
    ) -> list[dict]:
        """Greedy ``texts`` (``max_new_tokens`` each), then the passcode prompts (12
        tokens), posted to every deployment: one row per prompt, ``row[name]`` =
        ``answer(json, row)`` (:meth:`_ask_all`), ``row["secret"]`` the passcode or None."""
        a = self.args
        prompts = [{"text": t, "max_new_tokens": max_new_tokens} for t in texts]
        secrets = self.secret_prompts(model, a.secret_tokens, a.secret_trials)
        prompts += [{"text": s["text"], "max_new_tokens": 12, "secret": s} for s in secrets]
        rows = []
        for i, p in enumerate(prompts):
            body = {
                "text": p["text"],
                "sampling_params": {"temperature": 0, "max_new_tokens": p["max_new_tokens"]},
            }
            row = {"prompt": i, "secret": p.get("secret", {}).get("passcode")}
            self._ask_all(deps, body, row, answer)
            rows.append(row)
        return rows

    def secret_prompts(self, model: str, tokens: int, trials: int) -> list[dict]:
        """Passcode stated at the start of a ~``tokens``-token WikiText text, asked at the end."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        text = procs.WIKITEXT.read_text()
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

    def start_limit(self) -> float:
        return min(self.args.startup_timeout_s, max(10.0, self.remaining() - 30))

    def todo(self) -> dict[configs.Config, list[tuple[int, int]]]:
        """Per config (plan order), the points neither recorded nor failed before."""
        a, done = self.args, self.state.done()
        out = {}
        for cfg in self.configs:
            if self.skipped(cfg.name):
                continue
            keys = [(L, C, records.point_key(cfg, L, C)) for L in a.lengths for C in a.concurrency]
            pts = [(L, C) for L, C, k in keys if k not in done and not self.skipped(k)]
            if pts:
                out[cfg] = pts
        return out

    def plan(self) -> list[tuple[dict, float]]:
        """The groups still to run (pairs started together) with their estimated seconds."""
        todo = self.todo()
        size = self.group_size(todo)
        return [
            (grp, self.est.group(grp))
            for grp in ({c: todo[c] for c in g} for g in configs.groups(list(todo), size))
        ]

    def next_group(self, todo: dict, extra_s: float = 0.0) -> dict:
        """Up to --group-size pairs, first fit in plan order: a config joins while the
        group's estimate (+ ``extra_s``) stays within the time left, so the end of a
        call takes shorter configs that still fit."""
        size = self.group_size(todo)
        group: dict = {}
        for cfg, pts in todo.items():
            if len(group) >= size:
                break
            if self.est.group({**group, cfg: pts}) + extra_s <= self.remaining():
                group[cfg] = pts
        return group

    def phase_speed(self, with_correct: bool = False) -> None:
        """Groups of pairs until every point is recorded or the time is up;
        ``with_correct``: the correct phase runs while the first group starts (its
        SmolLM2 servers share the GPU with the starting 8B servers; nothing is measured
        until it ends)."""
        a, model = self.args, self.args.model8b
        extra = ["--load-format", "dummy", "--chunked-prefill-size", str(a.chunked_prefill)]
        if self.fit is not None:
            log(f"speed: at most {self.fit} pair(s) a start: what {self.gpu_name}'s memory holds")
        while True:
            todo = self.todo()
            if not Path(model, "config.json").is_file():
                log(f"speed: no model folder {model} (bench/gpu_model.py {model})")
                todo = {}
            if not todo:
                log("speed: nothing (more) to run")
                if with_correct:
                    self.phase_correct()
                return
            overlap = max(0.0, a.correct_budget_s - self.est.start()) if with_correct else 0.0
            group = self.next_group(todo, overlap)
            if not group and with_correct:  # not both: the correct phase first
                with_correct = False
                self.phase_correct()
                continue
            if not group:
                first = next(iter(todo))
                need = self.est.group({first: todo[first]})
                log(
                    f"speed: {self.remaining():.0f} s left < {need:.0f} s for {first.name} "
                    f"(and every later config): stop here (resume)"
                )
                return
            self.run_group(group, model, extra, self.phase_correct if with_correct else None)
            with_correct = False

    def run_group(self, group: dict, model: str, extra: list[str], meanwhile=None) -> None:
        """Start the group's pairs at once, run ``meanwhile`` (if any) while they start,
        then each pair's points in turn; stop them all."""
        a = self.args
        log(f"speed: starting {', '.join(c.name for c in group)} (~{self.est.group(group):.0f} s)")
        t0 = time.monotonic()
        deps = {
            cfg: self.launcher.pair(
                f"speed-{cfg.tag}", model, cfg, (a.mem_big, a.mem_big), extra,
                a.speed_tiers or None, bf16_tokens=a.cpu_max_tokens if a.cpu else a.big_max_tokens,
            )
            for cfg in group
        }  # fmt: skip
        try:
            if meanwhile is not None:
                meanwhile()
            try:
                self.launcher.wait(list(deps.values()), self.start_limit())
            except Exception as e:
                dead = [c for c, d in deps.items() if d.dead()]
                if not dead and self.near_deadline():
                    log(f"speed: not ready before the deadline (resume): {str(e)[:500]}")
                    return
                for c in dead or list(deps):
                    self.fail(c.name, f"start: {type(e).__name__}: {e}")
                names = ", ".join(c.name for c in dead or deps)
                log(f"speed: start FAILED ({names}): {str(e)[:3000]}")
                return
            took = time.monotonic() - t0
            if meanwhile is None:
                self.est.add_startup(took)
            log(
                f"speed: ready after {took:.0f} s; KV capacity (max_total_num_tokens) "
                + ", ".join(f"{c.name} {d.max_tokens}" for c, d in deps.items())
            )
            for cfg, dep in deps.items():
                self.run_points(dep, group[cfg])
        finally:
            self.launcher.stop(list(deps.values()))

    def run_points(self, dep: Deployment, points: list, tp: int = 1) -> None:
        """Warm ``dep`` up, then one bench_serving run per (length, concurrency) point."""
        try:
            self.warm_up(dep)
            for L, C in points:
                if self.remaining() < self.est.point(dep.cfg, L, C) + 15:
                    log(f"speed: {self.remaining():.0f} s left: {dep.tag} L={L} C={C} next call")
                    return
                rec = self.run_point(dep, L, C, tp)
                if rec is not None:
                    self.state["records"].append(rec)
                    self.save()
                dead = dep.dead()
                if dead:
                    raise RuntimeError(f"{dead.name} died:\n{dead.tail()}")
        except Exception as e:
            log(f"speed: {dep.tag} FAILED: {type(e).__name__}: {str(e)[:3000]}")
            if dep.dead() is None and self.near_deadline():
                log("speed: (at the deadline: not marked failed; the next call resumes)")
                return
            self.fail(dep.cfg.name + (f"|tp{tp}" if tp > 1 else ""), f"{type(e).__name__}: {e}")

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

    def run_point(self, dep: Deployment, L: int, C: int, tp: int = 1) -> dict | None:
        a, cfg = self.args, dep.cfg
        if dep.stats_path is not None:
            dep.stats_path.write_text("")
        # where this point's part of each server's log starts (SGLang's ReqTimeStats lines)
        log_start = {role: p.log_size() for role, (p, _) in dep.servers.items()}
        out_file = self.work / f"bench_{dep.tag}_{L}_{C}.jsonl"
        out_file.unlink(missing_ok=True)
        blog = self.launcher.logs / f"bench_{dep.tag}_{L}_{C}.log"
        argv = records.bench_argv(dep.url, a.model8b, L, C, a.output_len, a.num_prompts, out_file)
        t = time.monotonic()
        rc = self.bench.run(argv, blog, max(20, self.remaining() - 10))
        dur = time.monotonic() - t
        res = records.read_result(out_file)
        problem = records.result_problem(res, a.num_prompts)
        if problem:
            tail = blog.read_text(errors="replace")[-2500:] if blog.exists() else ""
            log(f"{dep.tag} L={L} C={C}: {problem} (bench {rc}; not recorded):\n{tail}")
            self.fail(records.point_key(cfg, L, C, tp), f"{problem}; bench {rc}")
            return None
        if int(res["completed"]) < a.num_prompts:
            log(
                f"{dep.tag} L={L} C={C}: only {res['completed']} of {a.num_prompts} "
                "requests completed"
            )
        self.est.add_point(cfg, L, C, dur)
        model_cfg = json.loads(Path(a.model8b, "config.json").read_text())
        ctx = records.Context(
            model_cfg, a.num_prompts, a.output_len, a.chunked_prefill, self.hardware(tp), tp
        )
        stats = report.read_jsonl(dep.stats_path)
        rec = records.make_record(cfg, L, C, res, stats, ctx, dep.max_tokens)
        rec["bench_s"] = round(dur, 1)
        rec["sglang_stage_ms"] = records.sglang_stages(
            {role: p.log_since(log_start[role]) for role, (p, _) in dep.servers.items()}
        )
        log(
            f"{dep.tag} L={L} C={C}: ttft p50 {rec['ttft_p50_ms']:.0f} ms mean "
            f"{rec['ttft_mean_ms']:.0f} p99 {rec['ttft_p99_ms']:.0f}, "
            f"{rec['req_per_s']:.2f} req/s, {rec['bytes_per_req'] / 2**20:.0f} MiB/req, "
            f"chosen b {rec['chosen_budget_mean']}, pack {rec['pack_ms']} transfer "
            f"{rec['transfer_ms']} unpack {rec['unpack_ms']} ms, link {rec['link_gbps']} Gb/s "
            f"({dur:.0f} s)"
        )
        if rec.get("timeline_ms"):  # the median request's events, ms after the decode saw it
            log("  timeline " + ", ".join(f"{k} {v:g}" for k, v in rec["timeline_ms"].items()))
        return rec

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
        tp, model, mem = 2, a.model8b, a.mem_big
        extra = ["--load-format", "dummy", "--chunked-prefill-size", str(a.chunked_prefill)]
        cfgs = {
            "b1": configs.Config("spectrum", 1.0, a.key_scales),
            "b0.5": configs.Config("spectrum", 0.5, a.key_scales),
            "mooncake": configs.Config("mooncake"),
        }
        tokens = a.big_max_tokens
        deps = {
            "single": self.launcher.single(
                "tp-single", model, mem, extra, tp=tp, bf16_tokens=tokens
            )
        }
        for n, cfg in cfgs.items():
            deps[n] = self.launcher.pair(
                f"speed-{cfg.tag}-tp{tp}", model, cfg, (mem, mem), extra,
                a.speed_tiers or None, tp, tokens,
            )  # fmt: skip
        result: dict = {"tp": tp, "hardware": self.hardware(tp), "link": "tcp"}
        result["model"] = "Llama-3-8B-shaped (bench/gpu_model.py), --load-format dummy"
        with self._phase("tp", deps, result):
            self.launcher.wait(list(deps.values()), self.start_limit())
            rng = random.Random(7)
            prompts = [{"text": t} for t in GREEDY_PROMPTS]
            prompts += [
                {"input_ids": [rng.randrange(300, 120000) for _ in range(n)]} for n in (3000, 12000)
            ]
            rows = []
            for i, p in enumerate(prompts):
                body = dict(p, sampling_params={"temperature": 0, "max_new_tokens": 16})
                row: dict = {"prompt": i}

                def answer(j: dict, row: dict):
                    row["prompt_tokens"] = j.get("meta_info", {}).get("prompt_tokens")
                    return j.get("output_ids") or j["text"]

                self._ask_all(deps, body, row, answer)
                rows.append(row)
                log(
                    f"tp prompt {i} ({row.get('prompt_tokens')} tokens): "
                    + ", ".join(
                        f"{n}={'same' if row[n] == row['single'] else row[n]!r:.40}" for n in cfgs
                    )
                )
            result["rows"] = rows
            for n in cfgs:
                result[f"{n}_identical_to_single"] = all(
                    r["single"] is not None and r[n] == r["single"] for r in rows
                )
            result["per_rank"] = {
                n: report.per_rank(report.read_jsonl(deps[n].stats_path)) for n in ("b1", "b0.5")
            }
            log(
                "tp: identical to single: "
                + ", ".join(f"{n} {result[f'{n}_identical_to_single']}" for n in cfgs)
                + f"; per rank {result['per_rank']}"
            )
            self.state["tp"] = result
            self.save()
            for L, C in a.tp_points:
                for n in ("mooncake", "b0.5"):
                    self.run_points(deps[n], [(L, C)], tp)

    # -------------------------------------------------------------- report

    def write_outputs(self) -> None:
        recs = self.state.records()
        (self.out / "serving_gpu.json").write_text(json.dumps(recs, indent=1) + "\n")
        for key in ("correct", "tp", "spec"):
            if self.state.get(key):
                path = self.out / f"serving_gpu_{key}.json"
                path.write_text(json.dumps(self.state[key], indent=1) + "\n")
        if self.state.get("spec"):
            from serving_gpu_spec import markdown as spec_markdown

            (self.out / "serving_gpu_spec.md").write_text(spec_markdown(self.state["spec"]))
        (self.out / "serving_gpu.md").write_text(
            report.markdown(
                recs, self.state.get("correct"), self.state.get("tp"), self.state["failed"]
            )
        )

    def phase_report(self) -> None:
        self.write_outputs()
        recs = self.state.records()
        if recs:
            try:
                report.plot(recs, self.out / "serving_gpu.png")
            except Exception as e:
                log(f"report: no plot ({type(e).__name__}: {e})")
        with tarfile.open(self.out / "serving_gpu_logs.tgz", "w:gz") as tf:
            for f in sorted(self.launcher.logs.glob("*.log")):
                data = f.read_bytes()[-200_000:]
                info = tarfile.TarInfo(f.name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        print(report.summary(recs, self.state.get("correct")), flush=True)
