"""The notebooks run top to bottom as a user runs them, in fast mode on real MNIST.

Each notebook is executed by a fresh Jupyter kernel (nbclient) from the notebooks/
folder, with the fast parameters injected after its ``parameters`` cell as papermill
does. Run times are printed (``pytest -s``): about two minutes for both on a shared
2-core CPU, nearly all of it the quickstart's one training epoch.
"""

import json
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO

NOTEBOOKS = REPO / "notebooks"


def execute(name: str, params: dict, env: dict, probe: str = ""
            ) -> tuple[nbformat.NotebookNode, str]:
  """Runs notebooks/`name` with `params`; returns it and what a final `probe` cell printed."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
  source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))
  if probe:
    nb.cells.append(nbformat.v4.new_code_cell(probe))
  # Progress bars left to the kernel's own detection, as for a user.
  kernel_env = {k: v for k, v in os.environ.items() if k != "BNET_PROGRESS"}
  start = time.perf_counter()
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(
                     env={**kernel_env, **env})
  print(f"\n{name}: executed in {time.perf_counter() - start:.0f} s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
  printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  return nb, printed


def images(nb: nbformat.NotebookNode) -> int:
  """Number of PNG images the executed notebook displays."""
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.outputs)


def widgets(nb: nbformat.NotebookNode) -> int:
  """Number of widgets (progress bars, sliders) the executed notebook displays."""
  return sum("application/vnd.jupyter.widget-view+json" in o.get("data", {})
             for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def quickstart(mnist_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quickstart"))
  probe = ("import json\nprint(json.dumps({'results': results, 'choice': choice, "
           "'speed': speed, 'fractions': fractions.tolist()}))")
  nb, printed = execute("quickstart.ipynb", {"FAST": True, "WORKDIR": workdir},
                        {"TFDS_DATA_DIR": mnist_data_dir}, probe)
  return workdir, nb, json.loads(printed)


def test_notebooks_are_stored_without_outputs():
  for path in sorted(NOTEBOOKS.glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def test_quickstart_trains_screens_and_times_the_cascade(quickstart):
  workdir, nb, out = quickstart
  assert out["results"]["test"]["num_examples"] == 10_000
  assert min(out["results"]["test"]["accuracy_per_exit"]) > 0.9  # One epoch of real MNIST.
  assert out["choice"]["chosen_on"] == "validation"
  assert out["choice"]["test"]["accuracy"] > 0.95
  assert sum(out["fractions"]) == pytest.approx(1.0)
  assert out["fractions"][0] > 0.5  # Most digits leave at the first exit.
  assert [s["batch_size"] for s in out["speed"]] == [1, 256]
  assert all(s["full_ms"] > 0 and s["cascade_ms"] > 0 for s in out["speed"])
  for name in ("accuracy_vs_cost.png", "exit_examples.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 10_000
  assert os.listdir(os.path.join(workdir, "tensorboard", "validation"))
  assert images(nb) >= 2
  assert widgets(nb), "no progress bar was drawn in the notebook"


def test_thresholds_notebook_explores_the_quickstart_workdir(quickstart):
  workdir = quickstart[0]
  probe = "print(len(values), float(sweep.accuracy.max()), sorted(sliders))"
  nb, printed = execute("thresholds.ipynb", {"FAST": True, "WORKDIR": workdir}, {}, probe)
  count, best, sliders = printed.split(" ", 2)
  assert int(count) > 10 and float(best) > 0.9
  assert sliders.strip() == "['T1']"
  for name in ("entropy_histograms.png", "threshold_sweep.png", "confusion.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 10_000
  assert images(nb) >= 3
  assert widgets(nb), "the threshold slider was not displayed"
