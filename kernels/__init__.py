"""Triton kernels of SpectrumKV: fused pack / unpack between SGLang KV pools and the wire format.

Installed as ``sglang_spectrum.kernels``. The torch reference of every byte is
:mod:`sglang_spectrum.codec`; these kernels write and read the same bytes.

Public API::

    plan = plan_transfer(layout, tiers, slots)            # once per request
    packed = pack_from_pools(k_pools, v_pools, slots, layout, tiers, plan=plan)
    info = unpack_to_pools(buffer, k_pools, v_pools, slots)   # validates first

Lower level: ``pack_payload`` / ``unpack_payload`` (kernel only, given a plan),
``fast_checksum`` (Triton twin of ``codec.payload_checksum``) and
``key_norm_scores_from_pools`` (fused key-norm importance).
"""

if __package__ == "kernels":
    # This folder imported as a top-level package: the repository root is on sys.path
    # (``python -m ...`` run from it) and transformers probes for the Hugging Face
    # ``kernels`` package by importing it. Stay an empty package without a version,
    # which transformers reports as unavailable, instead of failing the launch.
    __all__: list[str] = []
else:
    from .channel import ChannelTuning
    from .checksum import checksum_parts, combine_checksum, fast_checksum
    from .pack import pack_from_pools, pack_payload
    from .plan import TransferPlan, kernel_supported, plan_from_counts, plan_transfer, segment_table
    from .scoring import key_norm_scores_all_layers, key_norm_scores_from_pools
    from .unpack import unpack_payload, unpack_to_pools

    __all__ = [
        "ChannelTuning",
        "TransferPlan",
        "checksum_parts",
        "combine_checksum",
        "fast_checksum",
        "kernel_supported",
        "key_norm_scores_all_layers",
        "key_norm_scores_from_pools",
        "pack_from_pools",
        "pack_payload",
        "plan_from_counts",
        "plan_transfer",
        "segment_table",
        "unpack_payload",
        "unpack_to_pools",
    ]
