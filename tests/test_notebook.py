"""notebooks/demo.ipynb runs top to bottom under nbclient, on a tiny model instead of gemma3-270m.

The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH), so no
`python -m ipykernel install` is needed and the notebook sees the same kolora as the tests.
"""

import json
import sys

import pytest
from conftest import ROOT, TINY_TRAIN

NOTEBOOK = ROOT / "notebooks" / "demo.ipynb"
KERNEL = "kolora-test-venv"
pytestmark = pytest.mark.slow


def kernelspec_for_this_python(root) -> None:
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kolora test venv", "language": "python"}))


def with_parameters(nb, **values):
    """Papermill-style: a cell right after the one tagged `parameters` overrides its values."""
    import nbformat

    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


@pytest.fixture(scope="module")
def executed(tiny_models, small_csv, tmp_path_factory):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    tmp = tmp_path_factory.mktemp("notebook")
    kernelspec_for_this_python(tmp / "jupyter")
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    run = tmp / "run"
    flags = list(TINY_TRAIN)
    for key in ("--train.max_steps", "--train.eval_every", "--train.save_every"):  # the notebook sets these
        i = flags.index(key)
        del flags[i:i + 2]
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), MODEL=str(tiny_models["llama"]),
                         DATA=str(small_csv), RUN=str(run), MAX_STEPS=4, TRAIN_FLAGS=flags,
                         MAX_NEW_TOKENS=4, EVAL_SAMPLES=3)
    try:
        nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        mp.undo()
    return nb, run


def outputs(nb, containing: str) -> str:
    cell = next(c for c in nb.cells if c.cell_type == "code" and containing in c.source)
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_the_notebook_has_a_parameter_cell_and_no_shell_escapes():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert any("MODEL = " in src for src in code)
    assert not any(line.lstrip().startswith(("!", "%")) for src in code for line in src.splitlines())
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "commit it without outputs"


def test_prepare_estimate_train_chat_run_in_the_notebook(executed):
    nb, run = executed
    assert "tokens per example" in outputs(nb, '"prepare"')
    assert "verdict" in outputs(nb, '"estimate"')
    assert "test loss: base" in outputs(nb, '"train"')
    assert json.loads((run / "run.json").read_text(encoding="utf-8"))["summary"]["steps"] == 4
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    chat_out = outputs(nb, '"chat"')
    assert "$ kolora chat" in chat_out and chat_out.count("$ kolora") == 2


def test_eval_runs_in_the_notebook(executed):
    nb, run = executed
    assert "$ kolora eval" in outputs(nb, '"eval"')
    assert (run / "eval" / "report.html").is_file()
    assert json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))["data"]["n"] == 3
