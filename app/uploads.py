"""Keeps Gradio's upload folder bounded: anyone who can reach the app can upload, so files there are deleted after a
while (``max_age_s``) and the folder's total size is capped (``max_bytes``, oldest files first).

Nothing in that folder is needed for long: an uploaded picture is copied into the store (``<data_dir>/images``, never
swept) when it is used, and the pictures and exports the UI shows are written there again when needed. app.py points
Gradio at a folder of its own (``GRADIO_TEMP_DIR``, default ``<data_dir>/uploads``), so a sweep never touches
anyone else's files, and runs an ``UploadSweeper``: once at start, then every ``every_s`` seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_AGE_S = 3600
MAX_BYTES = 2 * 1024**3
EVERY_S = 60


@dataclass
class SweepResult:
    deleted: int  # files removed
    freed_bytes: int
    kept_bytes: int  # what is left (at most max_bytes)


def sweep(folder: str | os.PathLike, *, max_age_s: float = MAX_AGE_S, max_bytes: int = MAX_BYTES,
          now: float | None = None) -> SweepResult:
    """Delete files under ``folder`` last modified more than ``max_age_s`` ago, then the oldest of the rest until
    they take at most ``max_bytes``; then the folders this left empty. Links are removed, never followed; the
    folder itself stays. A file that vanishes meanwhile (Gradio moving it) is skipped."""
    root = Path(folder)
    now = time.time() if now is None else now
    files: list[tuple[float, int, str]] = []  # (mtime, size, path)
    for dirpath, _dirnames, filenames in os.walk(root):  # os.walk does not descend into linked folders
        for name in filenames:
            path = os.path.join(dirpath, name)
            with suppress(FileNotFoundError):
                st = os.lstat(path)
                files.append((st.st_mtime, st.st_size, path))
    files.sort()  # oldest first
    total = sum(size for _, size, _ in files)
    deleted = freed = 0
    touched: set[str] = set()
    for mtime, size, path in files:
        if now - mtime <= max_age_s and total <= max_bytes:
            break  # sorted by age: everything after this is younger, and the cap is met
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("uploads: cannot delete %s: %s", path, exc)
            continue
        total -= size
        deleted, freed = deleted + 1, freed + size
        touched.add(os.path.dirname(path))
    for folder_path in sorted(touched, key=len, reverse=True):  # deepest first
        _remove_empty_parents(Path(folder_path), root)
    if deleted:
        log.info("uploads: deleted %d file(s), %.1f MiB; %.1f MiB kept", deleted, freed / 2**20, total / 2**20)
    return SweepResult(deleted, freed, total)


def _remove_empty_parents(path: Path, root: Path) -> None:
    """Remove ``path`` and its parents up to (not including) ``root`` while they are empty."""
    root = root.resolve()
    path = path.resolve()
    while path != root and root in path.parents:
        try:
            path.rmdir()  # only succeeds when empty: a folder Gradio is filling right now stays
        except OSError:
            return
        path = path.parent


class UploadSweeper:
    """Runs :func:`sweep` on ``folder`` now and then every ``every_s`` seconds in a daemon thread."""

    def __init__(self, folder: str | os.PathLike, *, max_age_s: float = MAX_AGE_S, max_bytes: int = MAX_BYTES,
                 every_s: float = EVERY_S):
        self.folder = Path(folder)
        self.max_age_s, self.max_bytes, self.every_s = max_age_s, max_bytes, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> SweepResult:
        return sweep(self.folder, max_age_s=self.max_age_s, max_bytes=self.max_bytes)

    def start(self) -> UploadSweeper:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sweep()  # leftovers of an earlier run go first
        self._thread = threading.Thread(target=self._run, name="upload-sweeper", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep must not end the sweeping
                log.exception("uploads: sweep failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
