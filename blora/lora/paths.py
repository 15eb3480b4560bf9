"""Adapter paths confined to a root directory, and files opened so that symlinks cannot leave it.

One set of rules for every way a name or path from outside reaches the disk (adapters under a store root,
runtime loads through the server): the path, resolved with its symlinks, must lie inside the resolved
root; so must each adapter file, checked again on the file actually opened. A path that cannot be resolved
(a symlink loop, a name or path too long) is refused with an ``AdapterError`` that says why.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

from blora.lora.errors import AdapterError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MAX_PATH_CHARS = 4096  # Linux PATH_MAX; longer names fail in the kernel anyway
MAX_NAME_BYTES = 255  # NAME_MAX: one path component

_REASONS = {
    errno.ELOOP: "it runs into a symlink loop",
    errno.ENAMETOOLONG: "a name in it, or the whole path, is too long",
}


def os_reason(exc: BaseException) -> str:
    """A short reason for an ``OSError`` (or the ``RuntimeError`` of Python 3.11's symlink-loop check)."""
    if isinstance(exc, RuntimeError):
        return _REASONS[errno.ELOOP]
    code = getattr(exc, "errno", None)
    known = _REASONS.get(code) if isinstance(code, int) else None
    return known or getattr(exc, "strerror", None) or type(exc).__name__


def resolve(path: Path, what: str) -> Path:
    """``path.resolve()``, with loops and over-long names turned into an ``AdapterError`` about ``what``."""
    if len(str(path)) > MAX_PATH_CHARS:
        raise AdapterError(f"{what}: the path is longer than {MAX_PATH_CHARS} characters; refused")
    if any(len(os.fsencode(part)) > MAX_NAME_BYTES for part in path.parts):
        raise AdapterError(f"{what}: cannot resolve the path: {_REASONS[errno.ENAMETOOLONG]}; refused")
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: "Symlink loop" (Python 3.11)
        raise AdapterError(f"{what}: cannot resolve the path: {os_reason(exc)}; refused") from None


def is_inside(path: Path, real_root: Path) -> bool:
    """Whether the resolved ``path`` is ``real_root`` itself or below it."""
    return path == real_root or path.is_relative_to(real_root)


def resolve_inside(root: str | Path, path: str | Path, what: str) -> Path:
    """``path`` (relative to ``root`` or absolute) resolved; refused unless it lies strictly inside ``root``."""
    real_root = resolve(Path(root).expanduser(), f"adapter root {str(root)!r}")
    candidate = Path(path)
    resolved = resolve(candidate if candidate.is_absolute() else real_root / candidate, what)
    if resolved == real_root or not is_inside(resolved, real_root):
        raise AdapterError(
            f"{what} leaves the adapter root {str(root)!r} (symlinks are resolved before this check); refused"
        )
    return resolved


def check_relative_name(name: str) -> str:
    """Refuse an adapter *name* that could leave a root before touching the disk; returns it shortened for
    messages. Refused: empty names, NUL bytes, backslashes, absolute paths, ``~``, ``.``/``..``/empty
    components."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise AdapterError(f"adapter name {name!r} is not a valid relative name")
    shown = name if len(name) <= 80 else name[:77] + "..."
    if Path(name).is_absolute() or name.startswith("~"):
        raise AdapterError(
            f"adapter name {shown!r} is an absolute path; names are relative to the adapter root"
        )
    if any(part in ("..", ".", "") for part in name.split("/")):
        raise AdapterError(f"adapter name {shown!r} has '.', '..' or empty components; refused")
    return shown


def contained_path(root: str | Path, name: str) -> Path:
    """``root / name`` resolved, refusing names that could leave ``root``.

    Refused: the names ``check_relative_name`` refuses, paths longer than ``MAX_PATH_CHARS``, paths that
    cannot be resolved (symlink loops, names too long) and paths whose resolved location (after following
    symlinks) is not inside the resolved root.
    """
    shown = check_relative_name(name)
    return resolve_inside(root, name, f"adapter name {shown!r}")


class NotAnAdapterError(AdapterError):
    """The path exists inside the root but is not a PEFT adapter directory (no ``adapter_config.json``)."""


def adapter_dir_inside(root: str | Path, path: str | Path, name: str, what: str) -> Path | None:
    """The adapter directory at ``path`` (relative to ``root``, or absolute inside it), confined to ``root``.

    The one confinement rule for every name or path from outside (adapters found under a store root,
    runtime loads through the server): the directory, symlinks resolved, must lie strictly inside the
    resolved root, and so must each adapter file in it. Returns the resolved directory, or None when
    nothing exists there. Raises ``NotAnAdapterError`` when it exists without ``adapter_config.json``
    and ``AdapterError`` when it leaves the root or cannot be resolved; messages name ``what`` (the
    directory: "adapter name 'x'", "lora_path 'x'") or the adapter ``name`` (one of its files).
    """
    resolved = resolve_inside(root, path, what)
    try:
        if not resolved.exists():
            return None
        is_adapter = (resolved / "adapter_config.json").is_file()
    except OSError as exc:
        raise AdapterError(f"{what}: {os_reason(exc)}; refused") from None
    if not is_adapter:
        raise NotAnAdapterError(f"{what} is not a PEFT adapter directory (no adapter_config.json)")
    check_files_inside(root, resolved, name)
    return resolved


def check_files_inside(root: str | Path, path: Path, name: str) -> None:
    """The adapter's own files may not be symlinks to files outside the root either."""
    real_root = resolve(Path(root).expanduser(), f"adapter root {str(root)!r}")
    for fname in ADAPTER_FILES:
        f = path / fname
        try:
            present = f.is_symlink() or f.exists()
        except OSError as exc:
            raise AdapterError(f"adapter {name!r}: cannot check {fname}: {os_reason(exc)}; refused") from None
        if present and not is_inside(resolve(f, f"adapter {name!r}: {fname}"), real_root):
            raise AdapterError(f"adapter {name!r}: {fname} is a symlink out of the adapter root; refused")


def open_inside(path: Path, root: str | Path | None, where: str) -> BinaryIO:
    """``open(path, "rb")``; with a ``root``, the file actually opened (after every symlink) must lie
    inside it, checked on the open descriptor so that a symlink swapped in after a check cannot escape.
    Raises ``OSError`` as ``open`` does (the caller words it) and ``AdapterError`` for a file outside."""
    if len(str(path)) > MAX_PATH_CHARS:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
    f = open(path, "rb", buffering=0)  # noqa: SIM115 -- returned to the caller, who closes it
    if root is None:
        return f
    try:
        real_root = resolve(Path(root).expanduser(), f"adapter root {str(root)!r}")
        if not is_inside(_opened_path(f.fileno(), path), real_root):
            raise AdapterError(f"{where}: {path.name} is a symlink out of the adapter root; refused")
    except BaseException:
        f.close()
        raise
    return f


def _opened_path(fd: int, path: Path) -> Path:
    """Where descriptor ``fd`` really points (Linux: ``/proc/self/fd``; elsewhere the resolved path)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return Path(os.path.realpath(path))
