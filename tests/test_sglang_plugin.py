"""Fast tests of the SGLang plugin: activation, options, validation, patches.

Everything that imports SGLang runs in a fresh subprocess (as a server would),
so what is tested is the real activation path: the ``.pth`` file installed by
``pip install (-e) .`` plus the import hook, not an explicit ``activate()``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

from sglang_spectrum import patching
from sglang_spectrum.sglang_plugin import DISABLE_ENV, PTH_NAME

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# what launch_server needs on this machine; keeps subprocesses quiet and fast
BASE_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1", "MC_FORCE_TCP": "1"}


def run_py(code: str, env: dict[str, str] | None = None, timeout: float = 180) -> dict:
    """Run ``code`` in a fresh interpreter (outside the repo dir); it prints one JSON line last."""
    full_env = dict(os.environ, **BASE_ENV)
    full_env.pop(DISABLE_ENV, None)
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


def test_pth_file_installed():
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / PTH_NAME
    assert pth.is_file(), f"{pth} missing: install the package (pip install -e .)"
    src = REPO / "sglang_spectrum" / "sglang_plugin" / PTH_NAME
    assert pth.read_text() == src.read_text(), "installed .pth is stale: reinstall the package"


def test_interpreter_start_is_cheap():
    out = run_py(
        """
        import json, sys
        finder = sys.meta_path[0]
        print(json.dumps({
            "finder": type(finder).__name__,
            "heavy": sorted(m for m in ("torch", "sglang", "sglang_spectrum", "numpy", "logging")
                            if m in sys.modules),
        }))
        """
    )
    assert out["finder"] == "SpectrumImportFinder"
    assert out["heavy"] == [], "the .pth must not import anything heavy at interpreter start"


REGISTRATION_PROBE = """
import json, sys
import sglang.srt.server_args as sa
from sglang.srt.disaggregation.utils import KVClassType, TransferBackend
import sglang.srt.disaggregation.prefill as prefill
import sglang.srt.disaggregation.decode as decode
import sglang.srt.managers.disagg_service as disagg_service
out = {
    "choices": list(sa.DISAGG_TRANSFER_BACKEND_CHOICES),
    "enum": [m.value for m in TransferBackend],
    "has_budget_attr": hasattr(sa.ServerArgs, "spectrum_budget"),
}
if "spectrum" in out["enum"]:
    sb = TransferBackend("spectrum")
    out["classes"] = {
        t.name: getattr(prefill.get_kv_class(sb, t), "__name__", None) for t in KVClassType
    }
    gkc = prefill.get_kv_class
    out["same_dispatch"] = gkc is decode.get_kv_class is disagg_service.get_kv_class
    out["attach_hooks"] = [
        getattr(prefill.PrefillBootstrapQueue._init_kv_manager, "_sglang_spectrum_attach", False),
        getattr(decode.DecodePreallocQueue._init_kv_manager, "_sglang_spectrum_attach", False),
    ]
mooncake = TransferBackend("mooncake")
out["mooncake_sender"] = prefill.get_kv_class(mooncake, KVClassType.SENDER).__name__
print(json.dumps(out))
"""


def test_backend_registered_in_fresh_process():
    out = run_py(REGISTRATION_PROBE)
    assert out["choices"][-1] == "spectrum" and "mooncake" in out["choices"]
    assert "spectrum" in out["enum"]
    assert out["classes"] == {
        "KVARGS": "KVArgs",
        "MANAGER": "SpectrumKVManager",
        "SENDER": "SpectrumKVSender",
        "RECEIVER": "SpectrumKVReceiver",
        "BOOTSTRAP_SERVER": "SpectrumKVBootstrapServer",
    }
    assert out["same_dispatch"] is True
    assert out["attach_hooks"] == [True, True]
    assert out["mooncake_sender"] == "MooncakeKVSender"  # other backends untouched


def test_disable_env_turns_everything_off():
    out = run_py(REGISTRATION_PROBE, env={DISABLE_ENV: "1"})
    assert "spectrum" not in out["choices"]
    assert "spectrum" not in out["enum"]
    assert out["has_budget_attr"] is False
    assert out["mooncake_sender"] == "MooncakeKVSender"


def test_broken_plugin_leaves_sglang_working():
    out = run_py(
        """
        import json, logging, sys
        records = []
        class H(logging.Handler):
            def emit(self, r): records.append(r.getMessage())
        logging.getLogger("sglang_spectrum").addHandler(H())
        import sglang_spectrum.sglang_plugin.registry as registry
        def boom(module): raise RuntimeError("simulated bug")
        registry.install = boom
        import sglang.srt.server_args as sa
        from sglang.srt.disaggregation.utils import TransferBackend, KVClassType, get_kv_class
        args = sa.prepare_server_args(["--model-path", "dummy", "--device", "cpu"])
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


# --------------------------------------------------------------------------- options


def test_options_parse_and_reach_scheduler_pickle(smollm2):
    out = run_py(
        f"""
        import json, pickle
        from sglang.srt.server_args import prepare_server_args, ServerArgs
        base = ["--model-path", "{smollm2}", "--device", "cpu",
                "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "spectrum"]
        a = prepare_server_args(base + ["--spectrum-budget", "0.6", "--spectrum-tiers", "2",
                                        "--spectrum-allocator", "optimal",
                                        "--spectrum-probe-refresh",
                                        "--spectrum-rotation", "hadamard",
                                        "--spectrum-group-size", "32",
                                        "--spectrum-key-scales", "channel"])
        b = pickle.loads(pickle.dumps(a))  # what mp spawn does for the schedulers
        d = prepare_server_args(base)
        from sglang_spectrum.sglang_plugin.options import options_from_server_args
        print(json.dumps({{
            "child": options_from_server_args(b).to_dict(),
            "defaults": options_from_server_args(d).to_dict(),
            "programmatic": options_from_server_args(ServerArgs(model_path="dummy")).to_dict(),
        }}))
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
        "key_scales": "channel",
    }
    defaults = {
        "budget": 0.5,
        "tiers": "auto",
        "allocator": "paper",
        "probe_refresh": False,
        "arena_mb": 0.0,
        "rotation": "none",
        "group_size": None,
        "key_scales": "token",
    }
    assert out["defaults"] == defaults
    assert out["programmatic"] == defaults


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
    "tiers": (["--spectrum-tiers", "4"], "argument --spectrum-tiers: invalid choice: '4'"),
    "alloc": (["--spectrum-allocator", "x"], "argument --spectrum-allocator: invalid choice"),
    "drop2": (
        ["--spectrum-budget", "0.4", "--spectrum-tiers", "2"],
        "error: --spectrum-budget 0.4 is below 0.531, the least 2 tiers (FP16+INT8) can send",
    ),
    "drop3": (["--spectrum-budget", "0.25"], "error: --spectrum-budget 0.25 is below 0.281"),
    "drop_g32": (
        ["--spectrum-budget", "0.3", "--spectrum-tiers", "3", "--spectrum-group-size", "32"],
        "error: --spectrum-budget 0.3 is below 0.312, the least 3 tiers (FP16+INT8+INT4) can"
        " send for head_dim 64 and group size 32",
    ),
    "rot": (["--spectrum-rotation", "x"], "argument --spectrum-rotation: invalid choice: 'x'"),
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


def test_option_errors_exit_2_with_one_line_message(smollm2):
    cases = {k: v[0] for k, v in OPTION_ERRORS.items()}
    out = run_py(
        f"""
        import contextlib, io, json, traceback
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


# --------------------------------------------------------------------------- wire identity


def test_wire_identity_checks_in_process():
    out = run_py(
        """
        import json
        from sglang_spectrum.sglang_plugin import conn
        me = conn.wire_identity()
        other = dict(me, format_version=me["format_version"] + 1)
        msg = [b"1", b"x", conn.TRAILER_TAG, json.dumps(me).encode()]
        frames, peer = conn.split_trailer(msg)
        print(json.dumps({
            "ok": conn.incompatibility(me, "prefill at h:1", "decode"),
            "version": conn.incompatibility(other, "prefill at h:1", "decode"),
            "none": conn.incompatibility(None, "decode at h:2", "prefill"),
            "frames": [f.decode() for f in frames], "peer_ok": peer == me,
            "plain": conn.split_trailer([b"1", b"2", b"3"])[1],
        }))
        """
    )
    assert out["ok"] == ""
    assert out["version"].startswith("SpectrumKV format version mismatch: prefill at h:1 speaks v")
    assert "run the same sglang-spectrum version" in out["version"]
    assert "decode at h:2 is not a SpectrumKV server" in out["none"]
    assert out["frames"] == ["1", "x"] and out["peer_ok"] is True and out["plain"] is None


def test_prefill_refuses_rooms_of_incompatible_decode():
    """Prefill-side protocol logic on a manager without threads or sockets."""
    out = run_py(
        """
        import json, threading
        from sglang.srt.disaggregation.base.conn import KVPoll
        from sglang_spectrum.sglang_plugin import conn
        m = object.__new__(conn.SpectrumKVManager)
        m._peer_lock = threading.Lock(); m._decode_sessions = {}; m._failed_rooms = set()
        m._pinned_failures = {}; m.request_status = {}; m.failure_records = {}
        m.failure_lock = threading.Lock(); m.attn_tp_rank = m.pp_rank = m.attn_cp_rank = 0
        m.pp_size = m.attn_cp_size = m.attn_tp_size = 1
        m.identity = conn.wire_identity(); m._grants = {}
        sent = []
        class Sock:
            def send_multipart(self, frames): sent.append([f.decode() for f in frames])
        m._connect = lambda endpoint, is_ipv6=False: Sock()
        def sync(endpoint, port, room, status, rank): sent.append(["status", room, status])
        m.sync_status_to_decode_endpoint = sync
        good = conn.wire_identity(); bad = dict(good, format_version=99)
        trailer = lambda ident: [conn.TRAILER_TAG, json.dumps(ident).encode()]
        reg = lambda s: [b"None", b"10.0.0.1", b"5000", s.encode()] + [b""] * 11
        room = lambda r, s: [str(r).encode(), b"10.0.0.1", b"5000", s.encode()] + [b""] * 4
        res = {}
        res["reg_good"] = len(m._on_prefill_message(reg("s1") + trailer(good)))
        res["room_good"] = len(m._on_prefill_message(room(7, "s1") + trailer(good)))
        res["reg_bad"] = len(m._on_prefill_message(reg("s2") + trailer(bad)))
        res["room_bad"] = m._on_prefill_message(room(8, "s2") + trailer(bad))
        res["room_plain"] = m._on_prefill_message(room(9, "s3"))  # mooncake decode
        m.update_status(8, KVPoll.Bootstrapping)  # sender created after the refusal
        res["status8"] = m.request_status[8]
        res["reason8"] = m.failure_records[8]
        res["sent"] = sent
        res["reject"] = m._on_prefill_message([conn.REJECT_HEADER, b"11", b"why"])
        res["status11"] = m.request_status[11]
        print(json.dumps(res))
        """
    )
    assert out["reg_good"] == 15 and out["room_good"] == 8  # trailer stripped, passed on
    assert out["reg_bad"] == 15  # registration passes (SGLang keeps its bookkeeping)
    assert out["room_bad"] is None and out["room_plain"] is None  # consumed
    assert out["status8"] == 0 and "format version mismatch" in out["reason8"]  # Failed sticks
    fail_msgs = [s for s in out["sent"] if s[0] == "SPECTRUM_FAIL"]
    assert [s[1] for s in fail_msgs] == ["8"]  # only a SpectrumKV decode gets the reason
    assert ["status", 8, 0] in out["sent"] and ["status", 9, 0] in out["sent"]
    assert out["reject"] is None and out["status11"] == 0


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


# --------------------------------------------------------------------------- packed path units


def test_arena_first_fit_coalesces_and_regions_release_once():
    from sglang_spectrum.sglang_plugin.conn import ARENA_ALIGN, RegisteredArena

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


def test_receive_capacity_bounds_real_packed_sizes():
    import torch

    from sglang_spectrum.codec import pack_kv
    from sglang_spectrum.config import SpectrumConfig
    from sglang_spectrum.sglang_plugin.conn import receive_capacity

    layout = {"layers": 3, "kv_heads": 2, "head_dim": 64, "dtype": "bfloat16", "page_size": 1}
    torch.manual_seed(0)
    for n in (1, 5, 37, 300):
        keys = [torch.randn(n, 2, 64).to(torch.bfloat16) for _ in range(3)]
        values = [torch.randn(n, 2, 64).to(torch.bfloat16) for _ in range(3)]
        for budget in (1.0, 0.5, 0.3):
            for tiers in ("3", "2"):
                codecs = (
                    (None, "none", "token"),
                    (32, "hadamard", "token"),
                    (16, "none", "channel"),
                )
                for group, rotation, key_scales in codecs:
                    cfg = SpectrumConfig(
                        budget=budget,
                        tiers=tiers,
                        allow_drop=False,
                        group_size=group,
                        rotation=rotation,
                        key_scales=key_scales,
                    )
                    packed = pack_kv(keys, values, cfg)
                    cap = receive_capacity(layout, n, budget, group, key_scales)
                    assert packed.nbytes <= cap, (n, budget, tiers, group)
        assert receive_capacity(layout, n, 0.5) <= receive_capacity(layout, n, 1.0)
        # 2-tier mode with group 32 at b=0.5 needs more than the head_dim-group bound
        if n == 300:
            assert receive_capacity(layout, n, 0.5, 32) > receive_capacity(layout, n, 0.5)


def test_fault_switch_and_expand_pages(monkeypatch):
    from sglang_spectrum.sglang_plugin import conn

    monkeypatch.delenv(conn.FAULT_ENV, raising=False)
    assert conn.fault_for("x", [0]) is None
    monkeypatch.setenv(conn.FAULT_ENV, "truncate")
    counter = [0]
    assert [conn.fault_for("r", counter) for _ in range(3)] == ["truncate", None, None]
    monkeypatch.setenv(conn.FAULT_ENV, "rid")
    assert conn.fault_for("a-spectrum-fault-header-1", [0]) == "header"
    assert conn.fault_for("plain", [0]) is None
    monkeypatch.setenv(conn.TEST_DELAY_ENV, "2.5")
    assert conn.test_delay_s("k-spectrum-delay-1") == 2.5 and conn.test_delay_s("k") == 0.0
    assert conn.expand_pages([3, 5], 4).tolist() == [12, 13, 14, 15, 20, 21, 22, 23]
    assert conn.expand_pages([7, 2], 1).tolist() == [7, 2]


def test_bootstrap_refuses_layout_and_tp_mismatch():
    from sglang_spectrum.sglang_plugin import conn

    lay = {"layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "bfloat16", "page_size": 1}
    me = dict(conn.wire_identity(), layout=lay, attn_tp_size=1)
    assert conn.incompatibility(dict(me, tiers_resolved="3"), "prefill at h:1", "decode", me) == ""
    other = dict(me, layout=dict(lay, head_dim=128))
    msg = conn.incompatibility(other, "prefill at h:1", "decode", me)
    assert msg.startswith("SpectrumKV KV layout mismatch: prefill at h:1 has layers=30")
    assert "head_dim=128" in msg and "head_dim=64" in msg
    msg = conn.incompatibility(dict(me, attn_tp_size=2), "decode at h:2", "prefill", me)
    assert "same attention-TP size" in msg and "attn_tp_size=2" in msg
    msg = conn.incompatibility(dict(me, tiers_resolved="5"), "prefill at h:1", "decode", me)
    assert "unknown tier mode" in msg
