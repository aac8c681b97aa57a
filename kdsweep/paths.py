"""Where kdsweep keeps things on disk, and how it writes a folder that other processes read.

Imports neither torch nor transformers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """What kdsweep computes once (demo models, teacher caches): ``$KDSWEEP_CACHE``, else
    ``$XDG_CACHE_HOME/kdsweep``, else ``~/.cache/kdsweep``."""
    if os.environ.get("KDSWEEP_CACHE"):
        return Path(os.environ["KDSWEEP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdsweep"


def teacher_cache_dir() -> Path:
    """Teacher top-K caches: shared by every study and worker on the machine."""
    return cache_dir() / "teacher"


def sqlite_file(url: str | None) -> str | None:
    """The file of a ``sqlite:///`` store URL; None for an in-memory or a server store."""
    if not url or not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?")[0]
    return None if path in ("", ":memory:") else path


def store_identity(url: str) -> str:
    """What a store URL names, the same from every folder: a SQLite file by its absolute path
    (``sqlite:///kdsweep.db`` in two folders is two stores), a server by its URL."""
    path = sqlite_file(url)
    return str(Path(path).resolve()) if path else url


def store_missing(url: str | None) -> bool:
    """A SQLite store that does not exist yet. Reading commands check this first: opening a
    SQLite URL creates the file, and a report or a status only reads."""
    path = sqlite_file(url)
    return path is not None and not Path(path).exists()


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; when the block ends without an error the
    staging folder replaces ``final`` by one rename, otherwise it is deleted.

    So readers see either no folder or a whole one, never a half-written one, even if the writer
    is killed (a killed writer leaves only a hidden ``.<name>-*`` folder, which
    :func:`remove_stale_staging` clears). Callers that race to build the same folder hold a lock
    around this.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        yield staging
        # an incomplete folder of that name is worth nothing
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_staging(folder: Path, name_prefix: str) -> None:
    """Delete the staging folders that killed writers of ``folder/<name_prefix>...`` left behind
    (call it holding the writers' lock)."""
    for stale in folder.glob(f".{name_prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
