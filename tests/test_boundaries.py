"""Import boundaries: training -> checkpoint -> blip2 <- app. Checked in fresh interpreters."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return set(out.split())


def test_blip2_imports_neither_training_nor_app():
    loaded = modules_after("import blip2, blip2.cli, blip2.loading")
    assert "torch" in loaded  # the check below would be vacuous if the import had failed silently
    assert not {m for m in loaded if m.split(".")[0] in ("training", "app")}


def test_app_does_not_import_torch():
    loaded = modules_after("import app")
    assert "app" in loaded
    assert "torch" not in loaded and "blip2" not in loaded


def test_no_source_file_crosses_the_boundary():
    for path in (ROOT / "blip2").rglob("*.py"):
        text = path.read_text()
        assert "import training" not in text and "from training" not in text, path
        assert "from app" not in text and "import app" not in text, path
    for path in (ROOT / "app").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path


def test_blip2_has_no_import_cycles():
    import import_graph

    edges = import_graph.graph()
    assert "blip2.model" in edges and "blip2.checkpoint" in edges  # the graph was read (not vacuous)
    assert import_graph.cycles({m: deps for m, deps in edges.items() if m.split(".")[0] == "blip2"}) == []


def test_the_flow_is_one_way_in_the_import_graph():
    """From the code's imports, lazy ones included: blip2 imports neither training, app nor research; training never
    imports app or research (experiments use the product, never the reverse); app never imports blip2 (app.py, at
    the top level, is what joins them); and no package has an import cycle."""
    import import_graph

    edges = import_graph.graph()
    assert "training.stage2" in edges and "research.yes_no_head" in edges and "app.store" in edges
    forbidden = {"blip2": {"training", "app", "research"}, "training": {"app", "research"},
                 "app": {"blip2", "training", "research"}}
    crossings = [(module, dep) for module, deps in edges.items() for dep in deps
                 if dep.split(".")[0] in forbidden.get(module.split(".")[0], set())]
    assert crossings == []
    assert import_graph.cycles(edges) == []
