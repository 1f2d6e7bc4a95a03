"""The soak benchmark's CI variant (bench/soak.py; slow): a real PD deployment on CPU
with the adaptive budget (``--spectrum-budget auto``) under random lengths, client
cancels and a decode restart mid-run; afterwards no
request is lost, token usage is 0 on both servers and every per-request table of
the backend is back to its size before the run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

BENCH = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def test_soak_ci_variant(tmp_path):
    spec = importlib.util.spec_from_file_location("soak_bench", BENCH)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    out = tmp_path / "soak.json"
    report = soak.main(
        ["--requests", "100", "--concurrency", "24", "--max-len", "1200", "--out", str(out)]
        + ["--bootstrap-timeout-s", "45", "--settle-s", "150", "--budget", "auto"]
        + ["--log-dir", str(tmp_path / "logs")]  # the servers' logs stay for a failure
    )
    assert json.loads(out.read_text())["outcomes"] == report["outcomes"]
    outcomes = report["outcomes"]
    assert sum(outcomes.values()) == 100
    assert outcomes.get("lost", 0) == 0, report
    assert outcomes.get("answered", 0) >= 60, report  # the restart fails some, not most
    assert outcomes.get("cancelled", 0) > 0  # ~10 % cancelled by their client
    assert all(reason for reason in report["failure_reasons"]), report
    assert report["token_usage_after"] == {"prefill": 0, "decode": 0}, report
    assert report["state_back_to_start"], (report["state_before"], report["state_after"])
    assert len(report["decode_restart_s"]) == 1
    # the adaptive budget chose one per request, in its range [0.3, 1.0]
    chosen = report["chosen_budget"]
    assert chosen["requests"] > 0 and 0.3 <= chosen["mean"] <= 1.0, chosen
