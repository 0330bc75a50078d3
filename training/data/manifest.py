"""Pairs listed in a JSONL or CSV manifest."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator

from .pairs import PairDataset

__all__ = ["ManifestDataset"]


class ManifestDataset(PairDataset):
    """A JSONL (``{"image": path, "caption": text}`` per line; ``"text"`` also accepted, optional ``"id"``) or CSV
    (header with ``image`` and ``caption``/``text`` columns) manifest. Relative image paths are relative to the
    manifest's folder. Malformed lines, missing files and empty captions are skipped and counted here."""

    source = "manifest"

    def __init__(self, path, transform: Callable | None = None, source: str | None = None):
        super().__init__(transform)
        self.path = os.fspath(path)
        self.source = source or os.path.splitext(os.path.basename(self.path))[0]
        base = os.path.dirname(os.path.abspath(self.path))
        for line_no, row in self._rows():
            if row is None or not row.get("image"):
                self.skipped["bad_record"] += 1
                continue
            image = os.path.join(base, os.path.expanduser(str(row["image"])))
            if not os.path.isfile(image):
                self.skipped["missing_file"] += 1
                continue
            caption = row.get("caption", row.get("text"))
            self._add(image, caption, str(row.get("id") or f"{self.source}:{line_no}"), source=self.source)

    def _rows(self) -> Iterator[tuple[int, dict | None]]:
        if self.path.lower().endswith((".csv", ".tsv")):
            with open(self.path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if self.path.lower().endswith(".tsv") else ",")
                for line_no, row in enumerate(reader, start=2):
                    yield line_no, row
            return
        with open(self.path, encoding="utf-8-sig") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield line_no, row if isinstance(row, dict) else None
