"""The package layout: pipeline layers without upward imports or cycles, short names."""

import ast
import importlib
import subprocess
import sys

import pytest

from helpers import REPO

import bnet_jax

# Each layer may import from itself and the layers before it, never from a later one.
LAYERS = ("top", "nets", "inputs", "training", "inference", "thresholds", "reporting")


def _layer(module: str) -> str:
  """"bnet_jax.inference.cascade" -> "inference"; top-level modules -> "top"."""
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or parts[1] in LAYERS else "top"


def _imports() -> dict[str, set[str]]:
  """Every bnet_jax module (dotted name) -> the bnet_jax modules it imports."""
  graph = {}
  for path in (REPO / "bnet_jax").rglob("*.py"):
    name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnet_jax"):
        deps |= {f"{node.module}.{a.name}" for a in node.names}
      elif isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.startswith("bnet_jax")}
    graph[name] = deps
  modules = set(graph)
  # "from bnet_jax.inference import cascade" names a module; "from bnet_jax.nets import
  # Network" names an attribute of one.
  return {m: {d if d in modules else d.rsplit(".", 1)[0] for d in deps} - {m}
          for m, deps in graph.items()}


def test_no_module_imports_a_later_layer_or_a_short_name():
  graph = _imports()
  short = {f"bnet_jax.{s}" for s in bnet_jax.MODULES}
  for module, deps in graph.items():
    if module == "bnet_jax":
      continue
    assert not deps & short, f"{module} imports {sorted(deps & short)}: use the full path"
    for dep in deps - {"bnet_jax"}:
      assert LAYERS.index(_layer(dep)) <= LAYERS.index(_layer(module)), (
          f"{module} ({_layer(module)}) imports {dep} ({_layer(dep)}), a later layer")


def test_import_graph_has_no_cycles():
  graph, state = _imports(), {}

  def visit(module: str, path: list[str]) -> None:
    state[module] = "open"
    for dep in sorted(graph.get(module, ())):
      assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
      if dep not in state:
        visit(dep, path + [dep])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


@pytest.mark.parametrize("short", sorted(bnet_jax.MODULES))
def test_short_name_is_the_module_itself(short):
  module = importlib.import_module(bnet_jax.MODULES[short])
  assert getattr(bnet_jax, short) is module
  assert importlib.import_module(f"bnet_jax.{short}") is module
  assert module.__spec__.name == bnet_jax.MODULES[short]


def test_old_import_statements_work_in_a_fresh_process():
  code = ("import bnet_jax.cascade, bnet_jax.inference.cascade as c; "
          "from bnet_jax.train import train_and_evaluate; from bnet_jax import selection; "
          "assert bnet_jax.cascade is c; print(selection.__name__)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       check=True)
  assert out.stdout.strip() == "bnet_jax.thresholds.selection"
