"""The package's import structure: imports go down the layers, never up, never stage to stage.

Every module under src/kolora (not _vendor) is parsed, and every import of a kolora module —
at module level or inside a function — is checked against the layer list below. A module may
import only modules of a lower layer (never one of its own layer), so there is no cycle and a
reader can start at the bottom. Stages (one verb each) never import each other; `cli` only
parses and dispatches. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kolora"

# bottom to top; a module imports only modules in lower layers
LAYERS = [
    ["__init__", "errors", "interrupts", "files"],
    ["config", "data", "facts", "report"],
    ["prompt", "models", "device", "metrics", "html_report", "corpus"],
    ["runs", "checkpoint", "batching", "retrieval", "citations"],
    ["loss", "grounding"],
    ["generation", "merging", "estimator"],
    # stages: one verb each (info: models / inspect / doctor)
    ["prepare", "estimate", "train", "chat", "evaluate", "merge", "export", "serve", "info", "retrieve"],
    ["cli"],
    ["__main__"],
]
STAGES = set(LAYERS[-3])


def layer_of() -> dict[str, int]:
    return {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py"))


def kolora_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported kolora module) for every import in the file, wherever it is."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                if node.module:
                    found.append((node.lineno, node.module.split(".")[0]))
                else:
                    found += [(node.lineno, a.name) if (PACKAGE / f"{a.name}.py").exists() else (node.lineno, "__init__")
                              for a in node.names]
            elif node.module and (node.module == "kolora" or node.module.startswith("kolora.")):
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.append((node.lineno, parts[1]))
                else:
                    found += [(node.lineno, a.name if (PACKAGE / f"{a.name}.py").exists() else "__init__") for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kolora."):
                    found.append((node.lineno, a.name.split(".")[1]))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("kolora."):
                found.append((node.lineno, str(node.args[0].value).split(".")[1]))
    return [(line, name) for line, name in found if name != "_vendor"]


def test_every_module_has_a_layer():
    layers = layer_of()
    missing = [p.stem for p in modules() if p.stem not in layers]
    assert not missing, f"add these modules to a layer in tests/test_structure.py: {missing}"
    gone = [name for name in layers if not (PACKAGE / f"{name}.py").exists()]
    assert not gone, f"layer list names modules that do not exist: {gone}"


def test_imports_go_down_and_never_stage_to_stage():
    layers = layer_of()
    bad = []
    for path in modules():
        me = path.stem
        for line, other in kolora_imports(path):
            if other == me:
                continue
            if other not in layers:
                bad.append(f"{path.name}:{line} imports unknown module {other}")
            elif me in STAGES and other in STAGES:
                bad.append(f"{path.name}:{line} stage {me} imports stage {other}")
            elif layers[other] >= layers[me]:
                bad.append(f"{path.name}:{line} {me} (layer {layers[me]}) imports {other} (layer {layers[other]})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import hidden in a function body is found (a test that cannot fail is no test)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from .train import train\n    import kolora.chat\n    from kolora import evaluate\n")
    assert kolora_imports(f) == [(2, "train"), (3, "chat"), (4, "evaluate")]


def test_stages_expose_a_verb_interface():
    import importlib

    for name in STAGES:
        mod = importlib.import_module(f"kolora.{name}")
        verbs = getattr(mod, "VERBS", None)
        if verbs is None:
            assert callable(getattr(mod, "add_arguments", None)) and callable(getattr(mod, "run", None)), name
            assert isinstance(getattr(mod, "HELP", None), str), name
        else:
            for verb, (help_text, add_arguments, run) in verbs.items():
                assert isinstance(help_text, str) and callable(add_arguments) and callable(run), (name, verb)
