"""The README's API example is examples/api.py, and it runs (on mock MNIST)."""

import re
import runpy

import pytest
import tensorflow_datasets as tfds

from helpers import MOCK_EXAMPLES, REPO


@pytest.mark.newest
def test_readme_shows_examples_api_py_verbatim():
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
  example = (REPO / "examples" / "api.py").read_text().split('"""', 2)[2]
  assert example.strip() in [b.strip() for b in blocks]


@pytest.mark.newest
def test_api_example_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # The example's workdir is relative.
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    runpy.run_path(str(REPO / "examples" / "api.py"), run_name="__main__")
  printed = capsys.readouterr().out
  assert "Prediction(label=array([" in printed and "exit=array([" in printed
  assert (tmp_path / "workdirs" / "api" / "exits_test.npz").exists()
