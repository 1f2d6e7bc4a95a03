"""What a SpectrumKV server tells its peers about itself, and whether two servers fit.

Prefill ranks publish their identity at the bootstrap server (``PUT
/spectrum/register``; the decode reads ``GET /spectrum/info``); decode ranks send
theirs in their first message to each prefill rank (:class:`.messages.Register`).
Each side refuses a peer that differs in codec format version, plugin protocol,
KV layout (layers, KV heads, head_dim, page size) or attention-TP size, or whose
KV cache dtype pairs with its own in no way the codec supports (16-bit and FP8
pools pair every way: :func:`sglang_spectrum.sizes.pool_pair_problem`).
"""

from __future__ import annotations

import os
from typing import Any

from . import BACKEND_NAME, PROTOCOL_VERSION

# Testing only: pretend another codec format version (to exercise the refusal).
TEST_VERSION_ENV = "SGLANG_SPECTRUM_TEST_FORMAT_VERSION"
LAYOUT_KEYS = ("layers", "kv_heads", "head_dim", "dtype", "page_size")
SHAPE_KEYS = ("layers", "kv_heads", "head_dim", "page_size")  # must be equal; dtypes pair


def format_version() -> int:
    from sglang_spectrum.codec import FORMAT_VERSION

    override = os.environ.get(TEST_VERSION_ENV)
    return int(override) if override else int(FORMAT_VERSION)


def wire_identity(options: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """The identity of this server: backend, format version, protocol, options, ``fields``."""
    import sglang_spectrum

    ident: dict[str, Any] = {
        "backend": BACKEND_NAME,
        "format_version": format_version(),
        "protocol": PROTOCOL_VERSION,
        "plugin_version": getattr(sglang_spectrum, "__version__", "?"),
    }
    if options is not None:
        ident["options"] = options
    ident.update(fields)
    return ident


def layout_desc(layout: dict[str, Any]) -> str:
    return ", ".join(f"{k}={layout.get(k)}" for k in LAYOUT_KEYS)


def incompatibility(
    peer: dict[str, Any] | None,
    peer_desc: str,
    local_role: str,
    local: dict[str, Any] | None = None,
) -> str:
    """'' if ``peer`` speaks our wire format (and, given ``local``, our KV layout), else why not."""
    if not peer or peer.get("backend") != BACKEND_NAME:
        return (
            f"{peer_desc} is not a SpectrumKV server (it must run"
            f" --disaggregation-transfer-backend {BACKEND_NAME}); refusing the transfer"
        )
    mine = format_version()
    if peer.get("format_version") != mine or peer.get("protocol") != PROTOCOL_VERSION:
        return (
            f"SpectrumKV format version mismatch: {peer_desc} speaks"
            f" v{peer.get('format_version')} (protocol {peer.get('protocol')}), this"
            f" {local_role} server speaks v{mine} (protocol {PROTOCOL_VERSION}); run the"
            f" same sglang-spectrum version on prefill and decode"
        )
    if local is None:
        return ""
    p_tp, l_tp = peer.get("attn_tp_size"), local.get("attn_tp_size")
    if p_tp is not None and l_tp is not None and p_tp != l_tp:
        return (
            f"SpectrumKV needs the same attention-TP size on prefill and decode (KV heads are"
            f" packed per rank): {peer_desc} has attn_tp_size={p_tp}, this {local_role}"
            f" server has {l_tp}; use the same --tp-size on both"
        )
    p_lay, l_lay = peer.get("layout"), local.get("layout")
    p_draft, l_draft = (int((lay or {}).get("draft_layers") or 0) for lay in (p_lay, l_lay))
    if p_lay and l_lay and p_draft != l_draft:
        return (
            f"SpectrumKV: {peer_desc} ships {p_draft} speculative draft KV layers, this"
            f" {local_role} server has {l_draft}; run the same --speculative-algorithm and"
            " draft model on prefill and decode"
        )
    if p_lay and l_lay and any(p_lay.get(k) != l_lay.get(k) for k in SHAPE_KEYS):
        return (
            f"SpectrumKV KV layout mismatch: {peer_desc} has {layout_desc(p_lay)}, this"
            f" {local_role} server has {layout_desc(l_lay)}; serve the same model with the"
            f" same --page-size (and attention TP) on prefill and decode"
        )
    if p_lay and l_lay:
        from sglang_spectrum.sizes import pool_pair_problem

        pair = (p_lay, l_lay) if local_role == "decode" else (l_lay, p_lay)
        problem = pool_pair_problem(pair[0].get("dtype"), pair[1].get("dtype"))
        if problem:
            return problem
    tiers = peer.get("tiers_resolved")
    if tiers is not None and tiers not in ("3", "2"):
        return f"SpectrumKV: {peer_desc} packs with an unknown tier mode {tiers!r}"
    return ""
