"""Speculative decoding through the PD backends (bench/serving_gpu.py ``--phases spec``).

SGLang's speculative workers need CUDA, so this runs on the GPU only. Deployments, all
SmolLM2-135M (real weights), greedy, started together:

* ``single``: one server without speculative decoding (the reference answers);
* ``mooncake``, ``b1``, ``b0.5``: PD pairs (stock mooncake, spectrum at b=1.0 and 0.5)
  with STANDALONE speculative decoding whose draft model is the target itself.

A draft identical to its target proposes exactly what the target will accept, so the
decode's accept length (SGLang's ``meta_info.spec_accept_length``) is close to
``--speculative-num-draft-tokens`` when the draft model's KV reached the decode, and
falls towards 1 when the draft attends over KV it never received. The answers of the
spectrum pairs are compared with stock mooncake's (same speculative path) and the
single server's.

SGLang 0.5.17's PD decode builds the first speculative input only for the EAGLE family
(``SpeculativeAlgorithm.build_disagg_draft_input``: ``is_eagle()`` is EAGLE, EAGLE3 and
FROZEN_KV_MTP), so STANDALONE and NGRAM decodes crash on their startup warm-up with
every transfer backend, stock mooncake included (H200, 2026-12-04). ``EAGLE`` runs an
EAGLE head with dummy weights (:func:`eagle_draft`): its drafts are rarely accepted, so
it proves the path (draft KV packed, answers equal to mooncake's), not the accept length.
"""

from __future__ import annotations

import json
from pathlib import Path

import serving_gpu_configs as configs  # loaded by serving_gpu.py (bench/ is off sys.path)
from serving_procs import log

NUM_STEPS, DRAFT_TOKENS = 3, 4


def eagle_draft(model: str, folder: Path) -> Path:
    """An EAGLE draft head for ``model`` (``LlamaForCausalLMEagle``: one decoder layer of
    the target's attention shape, so its KV pool has the target's layout), config only:
    served with ``--speculative-draft-load-format dummy`` (models.md has no trained
    EAGLE head)."""
    config = json.loads((Path(model) / "config.json").read_text())
    # Untied head: SGLang hands the draft the target's embed and head separately
    # (set_embed_and_head), which a tied draft head cannot take.
    config.update(
        architectures=["LlamaForCausalLMEagle"], num_hidden_layers=1, tie_word_embeddings=False
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def spec_flags(model: str, algorithm: str, work: Path) -> list[str]:
    """Both PD roles run the draft: the prefill fills its KV, the decode drafts with it."""
    flags = ["--speculative-algorithm", algorithm]
    if algorithm == "STANDALONE":
        flags += ["--speculative-draft-model-path", model]
    elif algorithm == "EAGLE":
        draft = eagle_draft(model, work / "eagle-draft")
        flags += ["--speculative-draft-model-path", str(draft)]
        flags += ["--speculative-draft-load-format", "dummy"]
    return flags + [
        "--speculative-num-steps", str(NUM_STEPS),
        "--speculative-eagle-topk", "1",
        "--speculative-num-draft-tokens", str(DRAFT_TOKENS),
    ]  # fmt: skip


def phase_spec(runner) -> None:
    """Run the phase on ``runner`` (a :class:`serving_gpu_phases.Runner`); the result is
    kept in its state as ``spec`` (written to serving_gpu_spec.json / .md)."""
    a = runner.args
    model = runner.small_model_for("spec")
    if model is None:
        return
    m, tokens = a.mem_small, a.small_max_tokens or None
    base = ["--chunked-prefill-size", str(a.correct_chunked_prefill)]
    spec = base + spec_flags(model, a.spec_algorithm, runner.work)
    deps = {
        "single": runner.launcher.single("spec-single", model, m, base, bf16_tokens=tokens),
        # the reference: one server with the same speculative settings
        "single-spec": runner.launcher.single(
            "spec-single-spec", model, m, spec, bf16_tokens=tokens
        ),
    }
    pairs = {"mooncake": configs.Config("mooncake")}
    for b in a.spec_budgets:
        pairs[f"b{b:g}"] = configs.Config("spectrum", b, a.key_scales)
    for name, cfg in pairs.items():
        deps[name] = runner.launcher.pair(
            f"spec-{name}", model, cfg, (m, m), spec, bf16_tokens=tokens
        )
    drafts = {"STANDALONE": "the target model itself", "EAGLE": "an EAGLE head, dummy weights"}
    result = runner.phase_result(
        model,
        algorithm=a.spec_algorithm,
        draft=drafts.get(a.spec_algorithm),
        num_steps=NUM_STEPS,
        num_draft_tokens=DRAFT_TOKENS,
        pairs={name: cfg.name for name, cfg in pairs.items()},
    )
    with runner._phase("spec", deps, result):
        took = runner.launcher.wait(list(deps.values()), runner.start_limit())
        log(f"spec: {len(deps)} deployments ready in {took:.0f} s")

        def answer(j: dict, row: dict) -> tuple[str, float | None]:
            meta = j.get("meta_info", {})
            row["prompt_tokens"] = meta.get("prompt_tokens")
            return j["text"], meta.get("spec_accept_length")

        rows = runner.ask_prompts(deps, model, PROMPTS, 64, answer)
        for row in rows:
            row["accept_length"] = {}
            for name in deps:  # (text, accept length) -> the text and a column of its own
                row[name], row["accept_length"][name] = row.get(name) or (None, None)
            log(f"spec prompt {row['prompt']}: accept {row['accept_length']}")
        result["rows"] = rows
        result.update(summarise(rows, list(pairs)))
        result["stats"] = {
            name: runner_stats(deps[name].stats_path) for name in pairs if name != "mooncake"
        }
        log(
            f"spec: accept length mean {result['accept_length_mean']}; identical to mooncake"
            f" {result['identical_to_mooncake']}; to single {result['identical_to_single']};"
            f" secrets {result['secret']}"
        )


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "List three prime numbers:",
    "def fibonacci(n):",
    "Explain why the sky is blue in two sentences.",
]


def runner_stats(path) -> list[dict]:
    import serving_gpu_report as report

    return [r for r in report.read_jsonl(path) if r.get("role") == "prefill"]


def summarise(rows: list[dict], pairs: list[str]) -> dict:
    """Mean accept length per pair, answers identical to mooncake's / the single's."""
    out: dict = {
        "accept_length_mean": {},
        "identical_to_mooncake": {},
        "identical_to_single": {},
        "identical_to_single_spec": {},
    }
    for name in ["single-spec", *pairs]:
        acc = [r["accept_length"][name] for r in rows if r["accept_length"].get(name)]
        out["accept_length_mean"][name] = round(sum(acc) / len(acc), 3) if acc else None
        for ref, key in (
            ("single", "identical_to_single"),
            ("single-spec", "identical_to_single_spec"),
        ):
            if ref in rows[0] and name != ref:
                out[key][name] = sum(r[name] is not None and r[name] == r[ref] for r in rows)
        if name not in ("mooncake", "single-spec"):
            out["identical_to_mooncake"][name] = sum(
                r[name] is not None and r[name] == r["mooncake"] for r in rows
            )
    out["prompts"] = len(rows)
    secret = [r for r in rows if r["secret"]]
    out["secret"] = {
        name: sum(bool(r[name]) and r["secret"] in r[name] for r in secret)
        for name in ["single", "single-spec", *pairs]
    }
    return out


def markdown(spec: dict) -> str:
    """serving_gpu_spec.md: one row per deployment."""
    lines = [
        "# Speculative decoding through PD backends",
        "",
        f"Hardware: {spec.get('hardware')}. Model {spec.get('model')}, "
        f"{spec.get('algorithm')} speculative decoding, draft: {spec.get('draft')}, "
        f"{spec.get('num_steps')} steps, {spec.get('num_draft_tokens')} draft tokens; "
        f"{spec.get('prompts')} greedy prompts.",
        "",
    ]
    if spec.get("error"):
        return "\n".join(lines + [f"**Failed:** {spec['error']}", ""])
    n = spec.get("prompts", 0)

    def frac(key: str, name: str) -> str:
        v = spec.get(key, {}).get(name)
        return "-" if v is None else f"{v}/{n}"

    lines += [
        "| deployment | mean accept length | answers = mooncake PD | answers = single"
        " (same speculative settings) | answers = single (none) | passcodes |",
        "|---|---|---|---|---|---|",
        f"| single (no speculative decoding) | - | - | - | - | {spec['secret'].get('single')} |",
    ]
    names = {"single-spec": "single (same speculative settings)", **spec.get("pairs", {})}
    for name, config in names.items():
        if name == "single-spec" and "single-spec" not in spec["secret"]:
            continue  # a record from before the phase had this server
        lines.append(
            f"| {config} | {spec['accept_length_mean'].get(name)} |"
            f" {frac('identical_to_mooncake', name)} | {frac('identical_to_single_spec', name)} |"
            f" {frac('identical_to_single', name)} | {spec['secret'].get(name)} |"
        )
    return "\n".join(lines) + "\n"
