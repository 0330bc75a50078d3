"""The README stays true: its links resolve, it stays short, its test command is CI's, and the code blocks marked
``<!-- docs-test -->`` run as written.

A marked block is a fenced ``bash`` block on the line after the marker. Each non-comment line is one command, run
with ``shell=False`` (so no pipes, ``&&`` or redirections) in one scratch folder that mirrors the repository, in
order. A trailing comment ``# ... -> PATH`` promises that the command writes PATH; the test checks it exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKER = "<!-- docs-test -->"
TEST_COMMAND = "python -m pytest -q"
MAX_README_LINES = 220
# What a marked block may use from the checkout; symlinked into the scratch folder, never written through.
MIRRORED = ("blip2", "training", "app", "assets")


# -- parsing ------------------------------------------------------------------------------------------------------
def fenced_blocks(text: str) -> list[tuple[str, list[str], bool]]:
    """Every fenced block as (language, lines, marked), marked when the line before the fence is MARKER."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w+-]*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        marked = i > 0 and lines[i - 1].strip() == MARKER
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1)), None)
        assert end is not None, f"unclosed code fence at README line {i + 1}"
        blocks.append((fence.group(2), lines[i + 1:end], marked))
        i = end + 1
    return blocks


def marked_commands(text: str) -> list[tuple[list[str], list[str]]]:
    """(argv, promised output paths) for every command line of the marked bash blocks, in order."""
    commands = []
    for lang, lines, marked in fenced_blocks(text):
        if not marked:
            continue
        assert lang in ("bash", "sh"), f"{MARKER} marks a {lang or 'plain'} block; only bash blocks can run"
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            argv = shlex.split(line, comments=True)
            shell_syntax = {"&&", "||", "|", ";", ">", ">>", "<", "&"} & set(argv)
            assert not shell_syntax, f"docs-test commands run without a shell; {line!r} uses {shell_syntax}"
            comment = line[len(line.split("#", 1)[0]):] if "#" in line else ""
            promised = re.findall(r"->\s*(\S+)", comment)
            commands.append((argv, promised))
    return commands


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"^#{1,6}\s+(.*)$", line)
        if heading and not in_code:
            slug = _slug(heading.group(1))
            n = seen.get(slug, 0)
            found.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return found


def relative_links(path: Path) -> list[str]:
    """Targets of markdown links and images outside code blocks, except absolute URLs."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


# -- fast checks --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: broken links:\n" + "\n".join(broken)


def test_docs_folder_is_linked_from_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert DOCS and not missing, f"docs pages the README does not link: {missing}"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move detail into docs/"


def test_readme_keeps_space_front_matter():
    text = README.read_text()
    assert text.startswith("---\n"), "README.md must start with the Hugging Face Space YAML front matter"
    front = text.split("\n---\n", 1)[0]
    for key in ("sdk: gradio", "app_file: app.py"):
        assert f"\n{key}\n" in front + "\n", f"front matter lost {key!r}"


def test_readme_test_command_is_what_ci_runs():
    assert f"`{TEST_COMMAND}`" in README.read_text(), f"README.md should name the test command {TEST_COMMAND}"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci_lines, f".ci/run does not run {TEST_COMMAND!r}"
    blocks = [lines for lang, lines, _ in fenced_blocks(README.read_text()) if lang == "bash"]
    assert ["bash .ci/run"] in blocks, "README.md lost its `bash .ci/run` block"


def test_marked_blocks_parse():
    commands = marked_commands(README.read_text())
    assert commands, f"README.md has no {MARKER} block"
    for argv, _ in commands:
        assert argv[0] == "python", f"docs-test commands start with python: {argv}"


# -- the README's commands, end to end ----------------------------------------------------------------------------
@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    for name in MIRRORED:
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONPATH=str(tmp_path))
    last_stdout = ""
    for argv, promised in marked_commands(README.read_text()):
        argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, shell=False)
        assert result.returncode == 0, (
            f"{shlex.join(argv)} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}")
        for path in promised:
            assert (tmp_path / path).exists(), f"{shlex.join(argv)} should have written {path}"
        last_stdout = result.stdout
    # What the README's block says it produces, in more detail than the arrows.
    assert (tmp_path / "runs/stage1_tiny/stage1").is_dir()
    assert (tmp_path / "runs/stage2_tiny/checkpoint/blip2_config.json").is_file()
    results = sorted((tmp_path / "runs/eval/stage2_tiny").glob("eval_*.json"))
    assert results, "no eval_*.json under runs/eval/stage2_tiny/"
    assert json.loads(results[0].read_text()), f"{results[0]} is empty"
    assert last_stdout.strip(), "the caption command printed no caption"
