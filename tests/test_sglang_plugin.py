"""Fast tests of the SGLang plugin: registration, options, validation, wire, patches.

Everything that imports SGLang runs in a fresh subprocess (as a server would),
and activates the plugin the way SGLang does: ``sglang.srt.plugins.load_plugins()``
runs the ``sglang.srt.plugins`` entry points of the installed packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sglang_spectrum import patching
from sglang_spectrum.sglang_plugin import DISABLE_ENV
from sglang_spectrum.sglang_plugin.compat import sglang_version

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# what launch_server needs on this machine; keeps subprocesses quiet and fast
BASE_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1", "MC_FORCE_TCP": "1"}


def run_py(code: str, env: dict[str, str] | None = None, timeout: float = 240) -> dict:
    """Run ``code`` in a fresh interpreter (outside the repo dir); it prints one JSON line last."""
    full_env = dict(os.environ, **BASE_ENV)
    full_env.pop(DISABLE_ENV, None)
    full_env.pop("SGLANG_SPECTRUM_OPTIONS", None)
    full_env.update(env or {})
    proc = subprocess.run(
        [PY, "-W", "ignore", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd="/",
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from sglang_spectrum.models import ensure_model

    return ensure_model("smollm2-135m")


# --------------------------------------------------------------------------- activation


def test_entry_point_declared_and_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("spectrumkv") == "sglang_spectrum.sglang_plugin.plugin:register", eps
    assert "sglang.srt.plugins" in (REPO / "pyproject.toml").read_text()


REGISTRATION_PROBE = """
import json
from sglang.srt.plugins import load_plugins
load_plugins()
import sglang.srt.server_args as sa
from sglang.srt.disaggregation.utils import KVClassType, TransferBackend
import sglang.srt.disaggregation.prefill as prefill
import sglang.srt.disaggregation.decode as decode
from sglang_spectrum.sglang_plugin import plugin
out = {
    "choices": list(sa.DISAGG_TRANSFER_BACKEND_CHOICES),
    "enum": [m.value for m in TransferBackend],
    "registered": plugin.is_registered(),
}
if "spectrum" in out["enum"]:
    sb = TransferBackend("spectrum")
    out["classes"] = {
        t.name: getattr(prefill.get_kv_class(sb, t), "__name__", None) for t in KVClassType
    }
    out["same_dispatch"] = prefill.get_kv_class is decode.get_kv_class
mooncake = TransferBackend("mooncake")
out["mooncake_sender"] = prefill.get_kv_class(mooncake, KVClassType.SENDER).__name__
print(json.dumps(out))
"""


def test_backend_registered_through_sglang_plugin_loader():
    out = run_py(REGISTRATION_PROBE)
    assert "spectrum" in out["choices"] and "mooncake" in out["choices"]
    assert "spectrum" in out["enum"] and out["registered"] is True
    assert out["classes"] == {
        "KVARGS": "KVArgs",
        "MANAGER": "SpectrumKVManager",
        "SENDER": "SpectrumKVSender",
        "RECEIVER": "SpectrumKVReceiver",
        "BOOTSTRAP_SERVER": "SpectrumKVBootstrapServer",
    }
    assert out["same_dispatch"] is True
    assert out["mooncake_sender"] == "MooncakeKVSender"  # other backends untouched


@pytest.mark.parametrize("env", [{DISABLE_ENV: "1"}, {"SGLANG_PLUGINS": "someone-else"}])
def test_disabling_turns_everything_off(env):
    out = run_py(REGISTRATION_PROBE, env=env)
    assert "spectrum" not in out["choices"] and "spectrum" not in out["enum"]
    assert out["registered"] is False
    assert out["mooncake_sender"] == "MooncakeKVSender"


def test_broken_plugin_leaves_sglang_working():
    out = run_py(
        """
        import json, logging
        records = []
        class H(logging.Handler):
            def emit(self, r): records.append(r.getMessage())
        logging.getLogger("sglang_spectrum").addHandler(H())
        from sglang_spectrum.sglang_plugin import plugin
        def boom(): raise RuntimeError("simulated bug")
        plugin._add_choice = boom
        from sglang.srt.plugins import load_plugins
        load_plugins()
        import sglang.srt.server_args as sa
        from sglang.srt.disaggregation.utils import TransferBackend, KVClassType, get_kv_class
        print(json.dumps({
            "choices": list(sa.DISAGG_TRANSFER_BACKEND_CHOICES),
            "enum": [m.value for m in TransferBackend],
            "mooncake": get_kv_class(TransferBackend("mooncake"), KVClassType.MANAGER).__name__,
            "warnings": records,
        }))
        """
    )
    assert "spectrum" not in out["choices"] and "spectrum" not in out["enum"]
    assert out["mooncake"] == "MooncakeKVManager"
    assert any("simulated bug" in w and "plugin disabled" in w for w in out["warnings"])


def test_unsupported_sglang_version_is_refused_in_one_line(smollm2):
    out = run_py(
        f"""
        import contextlib, io, json
        from sglang_spectrum.sglang_plugin.compat import version
        version.sglang_version = lambda: "0.5.10.post1"  # what the check reads
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.server_args import prepare_server_args
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                prepare_server_args(["--model-path", "{smollm2}", "--device", "cpu",
                    "--disaggregation-mode", "prefill",
                    "--disaggregation-transfer-backend", "spectrum"])
            res = [None, ""]
        except SystemExit as e:
            res = [e.code, err.getvalue().strip().splitlines()[-1]]
        print(json.dumps(res))
        """
    )
    assert out[0] == 2
    assert out[1] == (
        "error: SpectrumKV supports SGLang 0.5.17 and 0.5.23; found SGLang 0.5.10.post1."
        " Install one of them (pip install sglang==0.5.23) or run the stock backends"
        " (unset --disaggregation-transfer-backend spectrum)"
    )


# --------------------------------------------------------------------------- options


def test_options_parse_and_reach_spawned_scheduler_processes(smollm2):
    out = run_py(
        f"""
        import json, subprocess, sys
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.server_args import prepare_server_args
        from sglang_spectrum.sglang_plugin.options import current_options

        base = ["--model-path", "{smollm2}", "--device", "cpu", "--disaggregation-mode",
                "prefill", "--disaggregation-transfer-backend", "spectrum"]
        defaults = current_options().to_dict()
        prepare_server_args(base + ["--spectrum-budget", "0.6", "--spectrum-tiers", "2",
                                    "--spectrum-allocator", "optimal",
                                    "--spectrum-probe-refresh",
                                    "--spectrum-rotation", "hadamard",
                                    "--spectrum-group-size", "32",
                                    "--spectrum-key-scales", "token",
                                    "--spectrum-stream", "off",
                                    "--spectrum-min-budget", "0.35",
                                    "--spectrum-ttft-slo-ms", "250",
                                    "--spectrum-staging", "host",
                                    "--spectrum-direct", "off",
                                    "--spectrum-layer-group", "8",
                                    "--spectrum-unpack", "sent"])
        # a scheduler process is a child of the launcher: it inherits the environment
        code = ("import json; from sglang_spectrum.sglang_plugin.options import current_options;"
                " print(json.dumps(current_options().to_dict()))")
        got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        print(json.dumps({{"child": json.loads(got.stdout), "defaults": defaults}}))
        """
    )
    assert out["child"] == {
        "budget": 0.6,
        "tiers": "2",
        "allocator": "optimal",
        "probe_refresh": True,
        "arena_mb": 0.0,
        "rotation": "hadamard",
        "group_size": 32,
        "key_scales": "token",
        "stream": "off",
        "min_budget": 0.35,
        "ttft_slo_ms": 250.0,
        "staging": "host",
        "direct": "off",
        "layer_group": 8,
        "unpack": "sent",
        "budget_mode": "fixed",
    }
    assert out["defaults"] == {
        "budget": 0.5,
        "tiers": "auto",
        "allocator": "paper",
        "probe_refresh": False,
        "arena_mb": 0.0,
        "rotation": "none",
        "group_size": None,
        "key_scales": "channel",
        "stream": "chunks",
        "min_budget": 0.3,
        "ttft_slo_ms": 0.0,
        "staging": "auto",
        "direct": "auto",
        "layer_group": 0,
        "unpack": "arrival",
        "budget_mode": "fixed",
    }


def _launch_server(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, **BASE_ENV)
    env.pop(DISABLE_ENV, None)
    return subprocess.run(
        [PY, "-m", "sglang.launch_server", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=timeout,
    )


def test_bad_budget_real_launch_server_exits_fast_with_clear_error():
    t0 = time.monotonic()
    proc = _launch_server(
        ["--model-path", "/nonexistent-model", "--device", "cpu", "--disaggregation-mode"]
        + ["prefill", "--disaggregation-transfer-backend", "spectrum", "--spectrum-budget", "1.5"]
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("error: --spectrum-budget must be in (0, 1], got 1.5"), last
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 90  # fails at argument parsing, no model load


OPTION_ERRORS = {
    "zero": (["--spectrum-budget", "0"], "error: --spectrum-budget must be in (0, 1], got 0"),
    "nan": (["--spectrum-budget", "nan"], "error: --spectrum-budget must be in (0, 1], got nan"),
    "word": (["--spectrum-budget", "x"], "error: --spectrum-budget must be a number in (0, 1]"),
    "min": (["--spectrum-min-budget", "0"], "error: --spectrum-min-budget must be in (0, 1]"),
    "min_drop": (
        ["--spectrum-budget", "auto", "--spectrum-min-budget", "0.2"],
        "error: --spectrum-min-budget 0.2 is below 0.281",
    ),
    "slo": (["--spectrum-ttft-slo-ms", "-5"], "error: --spectrum-ttft-slo-ms must be >= 0"),
    "tiers": (["--spectrum-tiers", "4"], "argument --spectrum-tiers: invalid choice: '4'"),
    "alloc": (["--spectrum-allocator", "x"], "argument --spectrum-allocator: invalid choice"),
    "stream": (["--spectrum-stream", "on"], "argument --spectrum-stream: invalid choice: 'on'"),
    "staging": (["--spectrum-staging", "gpu"], "argument --spectrum-staging: invalid choice"),
    "direct": (["--spectrum-direct", "on"], "argument --spectrum-direct: invalid choice: 'on'"),
    "unpack": (["--spectrum-unpack", "end"], "argument --spectrum-unpack: invalid choice: 'end'"),
    "layers": (
        ["--spectrum-layer-group", "-2"],
        "error: --spectrum-layer-group must be an integer >= 0 (0 = off), got '-2'",
    ),
    "layers_word": (
        ["--spectrum-layer-group", "4.5"],
        "error: --spectrum-layer-group must be an integer >= 0 (0 = off), got '4.5'",
    ),
    "layers_graph": (  # a captured prefill forward would skip the layer hooks
        ["--spectrum-layer-group", "8", "--cuda-graph-backend-prefill", "breakable"],
        "error: --spectrum-layer-group needs eager prefill forwards, but the prefill CUDA graph"
        " backend is breakable; add --cuda-graph-backend-prefill disabled",
    ),
    "drop2": (
        ["--spectrum-budget", "0.4", "--spectrum-tiers", "2"],
        "error: --spectrum-budget 0.4 is below 0.531, the least 2 tiers (FP16+INT8) can send",
    ),
    "drop3": (["--spectrum-budget", "0.25"], "error: --spectrum-budget 0.25 is below 0.281"),
    "drop_g32": (
        ["--spectrum-budget", "0.3", "--spectrum-tiers", "3", "--spectrum-group-size", "32"]
        + ["--spectrum-key-scales", "token"],
        "error: --spectrum-budget 0.3 is below 0.312, the least 3 tiers (FP16+INT8+INT4) can"
        " send for head_dim 64 and group size 32",
    ),
    "rot": (["--spectrum-rotation", "x"], "argument --spectrum-rotation: invalid choice: 'x'"),
    "keys": (["--spectrum-key-scales", "x"], "argument --spectrum-key-scales: invalid choice"),
    "group_odd": (
        ["--spectrum-group-size", "3"],
        "error: --spectrum-group-size must be an even integer >= 2 (0 = head_dim), got 3",
    ),
    "group_div": (
        ["--spectrum-group-size", "48"],
        "error: --spectrum-group-size 48 does not divide the model's head_dim 64",
    ),
    "nomode": (["--disaggregation-mode", "null"], "needs --disaggregation-mode prefill|decode"),
}
if sglang_version() != "0.5.17":  # 0.5.23 only: decode allocation policies
    OPTION_ERRORS["policy"] = (
        ["--disaggregation-decode-allocation-policy", "prefill_complete"],
        "supports --disaggregation-decode-allocation-policy early only",
    )


def test_adaptive_budget_option_values():
    from sglang_spectrum.sglang_plugin.options import SpectrumServerOptions, options_from_dict

    auto = SpectrumServerOptions(budget="auto", min_budget=0.35)
    assert auto.adaptive and auto.budget == 1.0 and auto.lowest_budget == 0.35
    assert auto.bound_codec().budget == 1.0  # regions hold a lossless part
    assert options_from_dict(auto.to_dict()) == auto  # survives the env / the handshake
    fixed = SpectrumServerOptions(budget=0.5)
    assert not fixed.adaptive and fixed.lowest_budget == 0.5


def test_host_staging_under_the_nvlink_transport_is_refused_at_launch(smollm2):
    out = run_py(
        f"""
        import contextlib, io, json, os
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.server_args import prepare_server_args
        os.environ["SGLANG_MOONCAKE_CUSTOM_MEM_POOL"] = "INTRA_NODE_NVLINK"
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                prepare_server_args(["--model-path", "{smollm2}", "--device", "cpu",
                                     "--disaggregation-mode", "decode",
                                     "--disaggregation-transfer-backend", "spectrum",
                                     "--spectrum-staging", "host"])
            print(json.dumps([None, ""]))
        except SystemExit as e:
            print(json.dumps([e.code, err.getvalue().strip().splitlines()[-1]]))
        """
    )
    code, last = out
    assert code == 2, out
    assert "--spectrum-staging host cannot be used with Mooncake's NVLink transport" in last


def test_option_errors_exit_2_with_one_line_message(smollm2):
    cases = {k: v[0] for k, v in OPTION_ERRORS.items()}
    out = run_py(
        f"""
        import contextlib, io, json, traceback
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.server_args import prepare_server_args
        base = ["--model-path", "{smollm2}", "--device", "cpu", "--disaggregation-mode",
                "prefill", "--disaggregation-transfer-backend", "spectrum"]
        res = {{}}
        for name, extra in {cases!r}.items():
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    prepare_server_args(base + extra)
                res[name] = [None, ""]
            except SystemExit as e:
                res[name] = [e.code, err.getvalue().strip().splitlines()[-1]]
            except Exception:
                res[name] = ["exception", traceback.format_exc()]
        print(json.dumps(res))
        """
    )
    for name, (_, message) in OPTION_ERRORS.items():
        code, last = out[name]
        assert code == 2, (name, code, last)
        assert message in last, (name, last)
        if name.startswith("drop"):
            assert "cannot drop tokens" in last


def test_no_drop_floor_matches_codec_accounting():
    from sglang_spectrum.sglang_plugin.options import no_drop_floor

    assert no_drop_floor("3", 64) == pytest.approx((32 + 4) / 128)
    assert no_drop_floor("auto", 64) == no_drop_floor("3", 64)
    assert no_drop_floor("2", 64) == pytest.approx((64 + 4) / 128)
    assert no_drop_floor("2", 128) < no_drop_floor("2", 64)
    # group 32: two (scale, zero) fp16 pairs per row instead of one
    assert no_drop_floor("3", 64, 32) == pytest.approx((32 + 8) / 128)
    assert no_drop_floor("3", 256, 32) == pytest.approx((128 + 32) / 512)
    # per-channel key scales: 4 bytes per channel per 64-row block, spread over the rows
    assert no_drop_floor("3", 64, None, "channel") == no_drop_floor("3", 64)
    assert no_drop_floor("3", 128, None, "channel") == pytest.approx((64 + 8 + 64 + 4) / 512)


def test_options_env_is_validated(monkeypatch):
    from sglang_spectrum.sglang_plugin import options

    monkeypatch.setenv(options.OPTIONS_ENV, '{"budget": 2}')
    with pytest.raises(options.SpectrumOptionError, match="must be in"):
        options.current_options()
    monkeypatch.setenv(options.OPTIONS_ENV, '{"nope": 1}')
    with pytest.raises(options.SpectrumOptionError, match="unknown SpectrumKV option"):
        options.current_options()
    monkeypatch.setenv(options.OPTIONS_ENV, "not json")
    with pytest.raises(options.SpectrumOptionError, match="not valid JSON"):
        options.current_options()


# --------------------------------------------------------------------------- wire


def test_wire_identity_checks():
    from sglang_spectrum.sglang_plugin.identity import incompatibility, wire_identity

    lay = {"layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "bfloat16", "page_size": 1}
    me = wire_identity(layout=lay, attn_tp_size=1)
    assert incompatibility(dict(me, tiers_resolved="3"), "prefill at h:1", "decode", me) == ""
    other = dict(me, format_version=me["format_version"] + 1)
    msg = incompatibility(other, "prefill at h:1", "decode")
    assert msg.startswith("SpectrumKV format version mismatch: prefill at h:1 speaks v")
    assert "run the same sglang-spectrum version" in msg
    assert "decode at h:2 is not a SpectrumKV server" in incompatibility(None, "decode at h:2", "p")
    msg = incompatibility(dict(me, layout=dict(lay, head_dim=128)), "prefill at h:1", "decode", me)
    assert msg.startswith("SpectrumKV KV layout mismatch: prefill at h:1 has layers=30")
    assert "head_dim=128" in msg and "head_dim=64" in msg
    msg = incompatibility(dict(me, attn_tp_size=2), "decode at h:2", "prefill", me)
    assert "same attention-TP size" in msg and "attn_tp_size=2" in msg
    msg = incompatibility(dict(me, tiers_resolved="5"), "prefill at h:1", "decode", me)
    assert "unknown tier mode" in msg


def test_messages_round_trip_and_reject_garbage():
    from sglang_spectrum.sglang_plugin import messages as m

    gen = 2**62 + 3
    grant = m.Grant(
        7, gen, "h:1", "10.0.0.1", 5000, 1 << 40, 4096, 3, 16, 2, required=1,
        identity={"backend": "spectrum"}, prefill_instance="abc",
    )  # fmt: skip
    sent = m.Sent(
        7, gen, 100, 2**62 + 5, [b"\x00" * 8, b"ab"], {"rid": "r", "ms": 1.5}, [[0, 100, 5, 9]]
    )
    failed = m.Failed(7, gen, "x", stale_peer=True)
    landed = m.Landed(7, gen, 2, [4096, 100, 5, 9, 8, 16])
    for msg in (grant, sent, m.Abort(7, gen, "h", 1, "why"), m.AbortAck(7, gen), failed, landed):
        assert m.decode(m.encode(msg)) == msg
    assert m.decode([b"ROOM", b"1"]) is None  # not ours (e.g. SGLang's own ABORT)
    assert m.decode([m.TAG_GRANT, b"\xc1garbage"]) is None
    assert m.decode([m.TAG_SENT]) is None


# --------------------------------------------------------------------------- patches


def test_patches_check_passes_on_installed_sglang():
    proc = subprocess.run(
        [PY, "-m", "sglang_spectrum.patching", "check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("applied") and "[runtime]" in ln for ln in lines), lines
    assert any(("applicable" in ln or "applied" in ln) and "[reference]" in ln for ln in lines)


def test_patch_apply_is_idempotent_and_detects_conflicts(tmp_path):
    site = patching.find_site_packages()
    patches = patching.load_patches()
    runtime = [p for p in patches if p.kind == patching.RUNTIME]
    assert runtime and all(p.files for p in runtime)
    # a scratch "site-packages" holding the pristine files (installed ones reverted)
    for p in runtime:
        for fp in p.files:
            dst = tmp_path / fp.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(site / fp.path, dst)
            lines = dst.read_text().splitlines(keepends=True)
            reverted = patching._apply_hunks(lines, fp.hunks, reverse=True)
            if reverted is not None:
                dst.write_text("".join(reverted))
    for p in runtime:
        assert patching.patch_state(tmp_path, p) == "applicable"
        assert patching.apply_patch(tmp_path, p) == "applied"
        before = {fp.path: (tmp_path / fp.path).read_bytes() for fp in p.files}
        assert patching.apply_patch(tmp_path, p) == "applied"  # second apply: no-op
        assert before == {fp.path: (tmp_path / fp.path).read_bytes() for fp in p.files}
    # break one patched line -> conflict, and `check` fails
    target = tmp_path / runtime[0].files[0].path
    target.write_text(target.read_text().replace("import", "imp0rt"))
    assert patching.patch_state(tmp_path, runtime[0]) == "conflict"
    rc = patching.main(["check", "--site-packages", str(tmp_path)])
    assert rc == 1


def test_reference_patch_is_not_applied_by_apply(tmp_path):
    patches = patching.load_patches()
    ref = [p for p in patches if p.kind == patching.REFERENCE]
    assert ref, "the extension-point patch must be in patches/"
    site = patching.find_site_packages()
    assert all(patching.patch_state(site, p) == "applicable" for p in ref)


# --------------------------------------------------------------------------- transport units


def test_arena_first_fit_coalesces_and_regions_release_once():
    from sglang_spectrum.sglang_plugin.transport import ARENA_ALIGN, RegisteredArena

    arena = RegisteredArena(10 * ARENA_ALIGN, "cpu", None, "test")
    a, b, c = arena.alloc(100), arena.alloc(ARENA_ALIGN), arena.alloc(5 * ARENA_ALIGN)
    assert (a.offset, b.offset, c.offset) == (0, 2 * ARENA_ALIGN, 3 * ARENA_ALIGN)
    assert a.capacity == 2 * ARENA_ALIGN and arena.alloc(3 * ARENA_ALIGN) is None  # full: defer
    b.release()
    b.release()  # idempotent
    a.release()
    assert arena.in_use == 5 * ARENA_ALIGN
    d = arena.alloc(3 * ARENA_ALIGN)  # a and b coalesced at the front
    assert d is not None and d.offset == 0
    assert d.ptr == arena.base and d.view(10).numel() == 10


def test_arena_size_follows_pool_and_budget():
    from sglang_spectrum.sglang_plugin.transport import MAX_ARENA, MIN_ARENA, arena_bytes

    gib = 1 << 30
    assert arena_bytes(0, 40 * gib, 0.5) == 5 * gib  # a quarter of the pool, packed at b
    assert arena_bytes(0, 100 << 20, 0.5) == MIN_ARENA
    assert arena_bytes(0, 1000 * gib, 1.0) == MAX_ARENA
    assert arena_bytes(24, 40 * gib, 0.5) == 24 << 20  # --spectrum-arena-mb wins
    # at least the region of the longest request (a 16k prompt at b=0.3 on a small pool)
    assert arena_bytes(0, 10 * gib, 0.3, largest=gib + 7) == gib + 7


def test_metadata_rows_round_trip_through_host_buffers():
    import torch

    from sglang_spectrum.sglang_plugin.transport import AuxRows

    src = [torch.arange(64, dtype=torch.int32).reshape(4, 16), torch.rand(4, 8)]
    dst = [torch.zeros_like(t) for t in src]
    lens = [t[0].nbytes for t in src]
    rows = AuxRows([t.data_ptr() for t in src], lens).read(2)
    AuxRows([t.data_ptr() for t in dst], lens).write(1, rows)
    assert all(torch.equal(d[1], s[2]) for d, s in zip(dst, src))
    assert all(not d[0].any() and not d[2:].any() for d in dst)
    with pytest.raises(ValueError, match="metadata row of"):
        AuxRows([dst[0].data_ptr()], [lens[0]]).write(0, [b"short"])
    if torch.cuda.is_available():  # rows in device memory (INTRA_NODE_NVLINK metadata)
        gsrc = [t.cuda() for t in src]
        gdst = [torch.zeros_like(t) for t in gsrc]
        dev = gsrc[0].device
        rows = AuxRows([t.data_ptr() for t in gsrc], lens, dev).read(3)
        assert rows == AuxRows([t.data_ptr() for t in src], lens).read(3)
        AuxRows([t.data_ptr() for t in gdst], lens, dev).write(0, rows)
        assert all(torch.equal(d[0].cpu(), s[3]) for d, s in zip(gdst, src))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_metadata_row_write_does_not_wait_for_the_default_stream():
    """The decode's control thread writes the metadata row (device memory under
    INTRA_NODE_NVLINK) before it reports Success: on the thread's current stream, the
    legacy default one, that copy waited for the forward queued there (H200, NVLink, 4k
    C=4: a decode step before every request's Success). Now it has a stream of its own."""
    import time

    import torch

    from sglang_spectrum.sglang_plugin.transport import AuxRows

    dst = torch.zeros(4, 16, dtype=torch.int32, device="cuda")
    rows = AuxRows([dst.data_ptr()], [dst[0].nbytes], dst.device)
    rows.write(0, [bytes(64)])  # the stream is made once
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued on the default stream
    rows.write(2, [torch.arange(16, dtype=torch.int32).numpy().tobytes()])
    took = time.perf_counter() - t0
    torch.cuda.synchronize()
    waited = time.perf_counter() - t0
    assert took < 0.25 * waited, (took, waited)
    assert torch.equal(dst[2].cpu(), torch.arange(16, dtype=torch.int32))


def test_receive_bound_holds_real_packed_sizes():
    import torch

    from sglang_spectrum.config import SpectrumConfig
    from sglang_spectrum.transfer import pack_request, packed_size_bound

    torch.manual_seed(0)
    layers, heads, dim = 3, 2, 64
    k = [torch.randn(400, heads, dim).to(torch.bfloat16) for _ in range(layers)]
    v = [torch.randn(400, heads, dim).to(torch.bfloat16) for _ in range(layers)]
    for n in (1, 5, 37, 300):
        slots = torch.randperm(400)[:n]
        for budget in (1.0, 0.6, 0.3):
            for key_scales in ("token", "channel"):
                # what the decode reserves: the prefill's codec at 2 tiers bounds both modes
                bound_cfg = SpectrumConfig(
                    budget=budget, tiers="2", key_scales=key_scales, allow_drop=False
                )
                bound = packed_size_bound(n, layers, heads, dim, "bfloat16", bound_cfg)
                for tiers in ("3", "2"):
                    cfg = bound_cfg.with_(tiers=tiers)
                    out = torch.empty(
                        packed_size_bound(n, layers, heads, dim, "bfloat16", cfg), dtype=torch.uint8
                    )
                    packed = pack_request(k, v, slots, cfg, out=out)
                    assert packed.nbytes <= bound, (n, budget, key_scales, tiers)


def test_fault_switch_and_expand_pages(monkeypatch):
    from sglang_spectrum.sglang_plugin import faults
    from sglang_spectrum.sglang_plugin.manager import expand_pages

    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    assert faults.fault_for("x", [0]) is None
    monkeypatch.setenv(faults.FAULT_ENV, "truncate")
    counter = [0]
    assert [faults.fault_for("r", counter) for _ in range(3)] == ["truncate", None, None]
    monkeypatch.setenv(faults.FAULT_ENV, "rid")
    assert faults.fault_for("a-spectrum-fault-header-1", [0]) == "header"
    assert faults.fault_for("a-spectrum-fault-header-1", [0], final=False) is None
    assert faults.fault_for("a-spectrum-fault-early-corrupt", [0], final=False) == "corrupt"
    assert faults.fault_for("a-spectrum-fault-early-corrupt", [0]) is None
    assert faults.fault_for("plain", [0]) is None
    monkeypatch.setenv(faults.FAULT_ENV, "stale")  # the first request's final part only
    assert faults.fault_for("r", [0], final=False) is None
    monkeypatch.setenv(faults.TEST_DELAY_ENV, "2.5")
    assert faults.test_delay_s("k-spectrum-delay-1") == 2.5 and faults.test_delay_s("k") == 0.0
    assert expand_pages([3, 5], 4).tolist() == [12, 13, 14, 15, 20, 21, 22, 23]
    assert expand_pages([7, 2], 1).tolist() == [7, 2]


def test_a_server_that_lost_its_http_port_fails_its_start_at_once(tmp_path):
    """uvicorn's bind failure leaves the server process alive without HTTP: waiting for
    health stops at that log line (naming EADDRINUSE, which PDDeployment.start retries
    on new ports) instead of at the startup timeout."""
    import sys
    import time

    from sglang_spectrum.sglang_plugin.launch import (
        DeploymentError,
        ManagedProcess,
        free_port,
        wait_healthy,
    )

    line = "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 1)"
    code = f"import time; print({line!r}, flush=True); time.sleep(60)"
    proc = ManagedProcess("decode", [sys.executable, "-c", code], tmp_path / "d.log", {})
    proc.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(DeploymentError, match="EADDRINUSE"):
            wait_healthy([(proc, f"http://127.0.0.1:{free_port()}")], t0, timeout_s=120)
        assert time.monotonic() - t0 < 30 and proc.alive()  # at once, not at the timeout
    finally:
        proc.stop()
