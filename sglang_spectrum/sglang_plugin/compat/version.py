"""The SGLang versions the backend supports, and the installed one's check."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED_VERSIONS = ("0.5.17", "0.5.23")


class UnsupportedSGLangError(RuntimeError):
    """The installed SGLang is not one the backend supports."""


def sglang_version() -> str:
    try:
        return version("sglang")
    except PackageNotFoundError:
        import sglang

        return str(getattr(sglang, "__version__", "unknown"))


def check_sglang_version(found: str | None = None) -> str:
    """The installed version, or :class:`UnsupportedSGLangError` with one clear line."""
    found = found or sglang_version()
    if found not in SUPPORTED_VERSIONS:
        raise UnsupportedSGLangError(
            f"SpectrumKV supports SGLang {' and '.join(SUPPORTED_VERSIONS)}; found SGLang"
            f" {found}. Install one of them (pip install sglang=={SUPPORTED_VERSIONS[-1]})"
            " or run the stock backends (unset --disaggregation-transfer-backend spectrum)"
        )
    return found
