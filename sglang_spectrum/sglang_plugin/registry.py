"""Registers the ``spectrum`` value of SGLang's ``TransferBackend`` and its classes.

Runtime equivalent of ``register_transfer_backend()`` in
``patches/0002-transfer-backend-plugin-registry.patch``:

* adds the member ``TransferBackend.SPECTRUM = "spectrum"`` to the existing enum
  (``disaggregation/utils.py:304``) so ``TransferBackend("spectrum")`` works in
  the scheduler, tokenizer manager and disagg service;
* replaces ``utils.get_kv_class`` (``disaggregation/utils.py:342``) by a wrapper
  that answers ``SPECTRUM`` from :mod:`.conn` and delegates every other
  backend; modules that already bound the old function get the new one too.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from typing import Any

from . import BACKEND_NAME

ENUM_NAME = "SPECTRUM"
# modules doing `from sglang.srt.disaggregation.utils import get_kv_class`
_IMPORTERS = (
    "sglang.srt.disaggregation.prefill",
    "sglang.srt.disaggregation.decode",
    "sglang.srt.managers.disagg_service",
)


def add_enum_member(enum_cls: type[Enum], name: str, value: Any) -> Enum:
    """Add a member to an existing (plain) Enum class; returns it (idempotent)."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    if name in enum_cls._member_map_:
        raise ValueError(f"{enum_cls.__name__}.{name} exists with another value")
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls  # type: ignore[attr-defined]
    member._sort_order_ = len(enum_cls._member_names_)  # type: ignore[attr-defined]
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)  # type: ignore[attr-defined]
    type.__setattr__(enum_cls, name, member)
    return member


def install(utils: Any) -> None:
    """Hook for ``sglang.srt.disaggregation.utils`` (idempotent)."""
    member = add_enum_member(utils.TransferBackend, ENUM_NAME, BACKEND_NAME)
    if utils.TransferBackend(BACKEND_NAME) is not member:
        raise RuntimeError("TransferBackend('spectrum') lookup failed after registration")
    original = utils.get_kv_class
    if getattr(original, "_sglang_spectrum", False):
        return

    @functools.wraps(original)
    def get_kv_class(transfer_backend, class_type):
        if transfer_backend is member or transfer_backend == BACKEND_NAME:
            from . import conn

            return conn.get_class(class_type)
        return original(transfer_backend, class_type)

    get_kv_class._sglang_spectrum = True  # type: ignore[attr-defined]
    utils.get_kv_class = get_kv_class
    for name in _IMPORTERS:  # only if imported before the hook ran (activate())
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "get_kv_class", None) is original:
            mod.get_kv_class = get_kv_class


def is_registered() -> bool:
    """True if SGLang's enum and dispatch know the spectrum backend in this process."""
    utils = sys.modules.get("sglang.srt.disaggregation.utils")
    if utils is None:
        return False
    return BACKEND_NAME in utils.TransferBackend._value2member_map_ and getattr(
        utils.get_kv_class, "_sglang_spectrum", False
    )
