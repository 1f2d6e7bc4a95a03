"""SpectrumKV: per-token mixed-precision KV cache transfer for SGLang PD disaggregation.

Public API::

    from sglang_spectrum import SpectrumConfig, pack_kv, unpack_kv, SpectrumFormatError
"""

from .codec import FORMAT_VERSION, KVLayout, PackedKV, UnpackInfo, decode_kv, pack_kv, unpack_kv
from .config import SpectrumConfig, SpectrumConfigError, SpectrumError, SpectrumFormatError
from .policy import Tier, allocate_tiers
from .scoring import score_tokens

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "KVLayout",
    "PackedKV",
    "SpectrumConfig",
    "SpectrumConfigError",
    "SpectrumError",
    "SpectrumFormatError",
    "Tier",
    "UnpackInfo",
    "allocate_tiers",
    "decode_kv",
    "pack_kv",
    "score_tokens",
    "unpack_kv",
]
