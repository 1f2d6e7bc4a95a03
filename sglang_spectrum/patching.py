"""Apply or check the upstream-style patches in ``patches/`` against the installed SGLang.

Usage::

    python -m sglang_spectrum.patching apply   # apply the runtime patches (idempotent)
    python -m sglang_spectrum.patching check   # every patch: applied or cleanly applicable
    python -m sglang_spectrum.patching status  # one line per patch, never fails

Each ``patches/*.patch`` file is a unified diff whose paths are relative to
site-packages (``a/sglang/srt/...``), preceded by a free-text header. The header
line ``SpectrumKV-Patch: runtime`` marks a patch that ``apply`` applies (needed
to run SGLang on CPU); ``SpectrumKV-Patch: reference`` marks documentation
(the upstream proposal of the plugin extension point): ``check`` verifies that
it still applies cleanly, ``apply`` leaves it alone.

An optional header line ``SpectrumKV-SGLang: 0.5.23`` (several versions
separated by spaces or commas) limits a patch to those installed SGLang
versions (read from the ``sglang-*.dist-info`` next to the package, without
importing it); patches for other versions are listed as ``skipped``. A patch
without that line applies to every version.

The applier is pure Python (no ``patch`` binary needed): hunks must match
exactly (a line offset is tolerated, fuzz is not). A patch is "applied" when
every hunk's new text is found, "applicable" when every hunk's old text is
found; a file is rewritten atomically only when all its hunks apply.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Patch",
    "PatchError",
    "apply_patch",
    "default_patch_dir",
    "find_site_packages",
    "load_patches",
    "main",
    "patch_state",
    "sglang_version",
]

RUNTIME = "runtime"
REFERENCE = "reference"
_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_KIND_RE = re.compile(r"^SpectrumKV-Patch:\s*(\S+)\s*$", re.MULTILINE)
_SUBJECT_RE = re.compile(r"^Subject:\s*(.+)$", re.MULTILINE)
_VERSIONS_RE = re.compile(r"^SpectrumKV-SGLang:\s*(.+?)\s*$", re.MULTILINE)


class PatchError(Exception):
    """A patch file is malformed or does not fit the installed files."""


@dataclass
class Hunk:
    old_start: int  # 1-based line number in the original file
    old: list[str] = field(default_factory=list)  # lines incl. "\n"
    new: list[str] = field(default_factory=list)


@dataclass
class FilePatch:
    path: str  # relative to site-packages
    hunks: list[Hunk] = field(default_factory=list)


@dataclass
class Patch:
    name: str
    kind: str  # RUNTIME or REFERENCE
    subject: str
    files: list[FilePatch]
    sglang_versions: tuple[str, ...] = ()  # empty: every SGLang version

    def fits(self, sglang_version: str | None) -> bool:
        """Whether this patch is meant for ``sglang_version`` (None: unknown -> yes)."""
        return (
            not self.sglang_versions
            or sglang_version is None
            or (sglang_version in self.sglang_versions)
        )


def default_patch_dir() -> Path:
    """``patches/`` of the source checkout (next to the package directory)."""
    return Path(__file__).resolve().parent.parent / "patches"


def find_site_packages() -> Path:
    """Directory holding the installed ``sglang`` package (without importing it)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("sglang is not installed in this environment")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def sglang_version(site: Path | None = None) -> str | None:
    """Version of the SGLang installed in ``site`` (default: this environment's), or None."""
    if site is not None:
        infos = sorted(Path(site).glob("sglang-*.dist-info"))
        if infos:
            return infos[-1].name[len("sglang-") : -len(".dist-info")]
        if (Path(site) / "sglang").is_dir():
            return None  # a bare copy (tests): fall through to this environment's
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("sglang")
    except PackageNotFoundError:
        return None


def _strip_prefix(path: str) -> str:
    path = path.split("\t", 1)[0].strip()
    if path.startswith(("a/", "b/")):
        path = path[2:]
    return path


def parse_patch(text: str, name: str = "<patch>") -> Patch:
    """Parse a unified diff (with an optional free-text header) into hunks."""
    kind_m = _KIND_RE.search(text.split("\n---", 1)[0])
    kind = kind_m.group(1) if kind_m else RUNTIME
    if kind not in (RUNTIME, REFERENCE):
        raise PatchError(f"{name}: unknown 'SpectrumKV-Patch: {kind}' (runtime|reference)")
    subj_m = _SUBJECT_RE.search(text)
    head = text.split("\n---", 1)[0]
    ver_m = _VERSIONS_RE.search(head)
    versions = tuple(v for v in re.split(r"[\s,]+", ver_m.group(1)) if v) if ver_m else ()
    lines = text.splitlines(keepends=True)
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            new_path = _strip_prefix(lines[i + 1][4:])
            if new_path == "/dev/null" or _strip_prefix(line[4:]) == "/dev/null":
                raise PatchError(f"{name}: creating/deleting files is not supported")
            files.append(FilePatch(new_path))
            i += 2
            continue
        m = _HUNK_RE.match(line)
        if m:
            if not files:
                raise PatchError(f"{name}: hunk before any file header")
            old_len = int(m.group(2)) if m.group(2) is not None else 1
            new_len = int(m.group(4)) if m.group(4) is not None else 1
            hunk = Hunk(old_start=int(m.group(1)))
            i += 1
            while i < len(lines) and (len(hunk.old) < old_len or len(hunk.new) < new_len):
                body = lines[i]
                tag, content = body[:1], body[1:]
                if body.startswith("\\"):  # "\ No newline at end of file"
                    target = hunk.new if (hunk.new and lines[i - 1][:1] in "+ ") else hunk.old
                    target[-1] = target[-1].rstrip("\n")
                elif tag == " " or body in ("\n", ""):
                    content = content if tag == " " else "\n"
                    hunk.old.append(content)
                    hunk.new.append(content)
                elif tag == "-":
                    hunk.old.append(content)
                elif tag == "+":
                    hunk.new.append(content)
                else:
                    raise PatchError(f"{name}: malformed hunk line {i + 1}: {body!r}")
                i += 1
            if len(hunk.old) != old_len or len(hunk.new) != new_len:
                raise PatchError(f"{name}: truncated hunk in {files[-1].path}")
            files[-1].hunks.append(hunk)
            continue
        i += 1
    if not files:
        raise PatchError(f"{name}: no file changes found")
    return Patch(
        name=name,
        kind=kind,
        subject=subj_m.group(1).strip() if subj_m else "",
        files=files,
        sglang_versions=versions,
    )


def load_patches(
    patch_dir: Path | None = None, site: Path | None = None, all_versions: bool = False
) -> list[Patch]:
    """The patches in ``patch_dir`` meant for the SGLang installed in ``site``
    (default: this environment's); every patch with ``all_versions``."""
    patch_dir = Path(patch_dir) if patch_dir else default_patch_dir()
    paths = sorted(patch_dir.glob("*.patch"))
    if not paths:
        raise PatchError(f"no *.patch files in {patch_dir}")
    patches = [parse_patch(p.read_text(encoding="utf-8"), p.name) for p in paths]
    if all_versions:
        return patches
    ver = sglang_version(site)
    return [p for p in patches if p.fits(ver)]


def _find_block(lines: list[str], block: list[str], hint: int, start: int) -> int:
    """Index of ``block`` in ``lines`` at/after ``start``, nearest to ``hint``; -1 if absent."""
    n = len(block)
    if n == 0:
        return max(hint, start)
    candidates = [
        j
        for j in range(start, len(lines) - n + 1)
        if lines[j] == block[0] and lines[j : j + n] == block
    ]
    return min(candidates, key=lambda j: abs(j - hint)) if candidates else -1


def _apply_hunks(lines: list[str], hunks: list[Hunk], reverse: bool = False) -> list[str] | None:
    """The file after applying (or reverting) ``hunks``; None if one does not match."""
    out = list(lines)
    offset = 0
    pos = 0
    for h in hunks:
        old, new = (h.new, h.old) if reverse else (h.old, h.new)
        j = _find_block(out, old, h.old_start - 1 + offset, pos)
        if j < 0:
            return None
        out[j : j + len(old)] = new
        offset += len(new) - len(old)
        pos = j + len(new)
    return out


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def file_state(site: Path, fp: FilePatch) -> str:
    """'applied', 'applicable', 'missing' or 'conflict' for one file of a patch."""
    target = site / fp.path
    if not target.is_file():
        return "missing"
    lines = _read_lines(target)
    # New text present in order (the patch reverts cleanly): applied. Added lines
    # never occur in the pristine file, so this cannot fire before applying.
    if _apply_hunks(lines, fp.hunks, reverse=True) is not None:
        return "applied"
    if _apply_hunks(lines, fp.hunks) is not None:
        return "applicable"
    return "conflict"


def patch_state(site: Path, patch: Patch) -> str:
    """'applied' (all files), 'applicable' (all files clean), 'partial' or 'conflict'."""
    states = {file_state(site, fp) for fp in patch.files}
    if states == {"applied"}:
        return "applied"
    if states <= {"applied", "applicable"}:
        return "applicable" if states == {"applicable"} else "partial"
    return "conflict"


def _atomic_write(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def apply_patch(site: Path, patch: Patch) -> str:
    """Apply ``patch`` (file by file, skipping files already patched). Returns the new state."""
    plans: list[tuple[Path, list[str]]] = []
    for fp in patch.files:
        st = file_state(site, fp)
        if st == "applied":
            continue
        if st != "applicable":
            raise PatchError(f"{patch.name}: {fp.path} is {st} (installed SGLang differs?)")
        target = site / fp.path
        new = _apply_hunks(_read_lines(target), fp.hunks)
        assert new is not None
        plans.append((target, new))
    for target, new in plans:  # write only after every file was checked
        _atomic_write(target, "".join(new))
    return patch_state(site, patch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sglang_spectrum.patching",
        description="Apply/check the patches in patches/ against the installed SGLang.",
    )
    ap.add_argument("command", choices=["apply", "check", "status"])
    ap.add_argument("--patch-dir", type=Path, default=None, help="default: <repo>/patches")
    ap.add_argument(
        "--site-packages", type=Path, default=None, help="default: where sglang is installed"
    )
    args = ap.parse_args(argv)
    try:
        site = args.site_packages or find_site_packages()
        patches = load_patches(args.patch_dir, all_versions=True)
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rc = 0
    ver = sglang_version(args.site_packages)
    for p in patches:
        if not p.fits(ver):
            if args.command != "apply":
                wanted = " ".join(p.sglang_versions)
                print(f"{'skipped':<10} {p.name} [{p.kind}] (for sglang {wanted})")
            continue
        state = patch_state(site, p)
        if args.command == "apply" and p.kind == RUNTIME and state != "applied":
            try:
                state = apply_patch(site, p)
                print(f"applied    {p.name}")
            except PatchError as e:
                print(f"FAILED     {p.name}: {e}", file=sys.stderr)
                rc = 1
            continue
        ok = state == "applied" or (state == "applicable")
        label = state if ok else state.upper()
        if args.command == "apply":
            if p.kind == RUNTIME:
                print(f"{label:<10} {p.name} (already)")
            continue
        print(f"{label:<10} {p.name} [{p.kind}]")
        if args.command == "check" and not ok:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
