"""The import contract of the package (docs/architecture.md, "Layout"): imports go one way.

Every import in bertjax counts, at module level or inside a function, under TYPE_CHECKING or not.
The rules are checked on the source (every module, every import) and once at run time (what
importing the input pipeline actually loads).
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bertjax"

# What each part of the package may import from bertjax (module prefixes), besides itself. The
# order is the layering: nothing imports a part listed after it.
ALLOWED = {
  "bertjax.errors": (),
  "bertjax.storage": ("bertjax.errors",),
  "bertjax.atomic": ("bertjax.storage",),
  "bertjax.tasks": (),  # the fine-tuning task tables: what the config checks and the tasks both read
  "bertjax.data": ("bertjax.errors", "bertjax.atomic", "bertjax.storage"),
  "bertjax.model.config": ("bertjax.errors",),
  "bertjax.parallel.layout": ("bertjax.errors",),
  "bertjax.config": (
    "bertjax.errors",
    "bertjax.atomic",
    "bertjax.storage",
    "bertjax.model.config",
    "bertjax.parallel.layout",
    "bertjax.data.corpus",
    "bertjax.data.limits",
    "bertjax.tasks",
  ),
  "bertjax.parallel": ("bertjax.errors",),
  "bertjax.model": ("bertjax.errors", "bertjax.parallel.rules"),
  "bertjax.metrics": ("bertjax.errors", "bertjax.atomic", "bertjax.storage", "bertjax.model.config"),
  "bertjax.train": (
    "bertjax.errors",
    "bertjax.atomic",
    "bertjax.storage",
    "bertjax.config",
    "bertjax.data",
    "bertjax.model",
    "bertjax.parallel",
    "bertjax.metrics",
  ),
  # Fine-tuning is built on pretraining: its model, steps, checkpoints, metrics and loop parts.
  "bertjax.finetune": (
    "bertjax.errors",
    "bertjax.tasks",
    "bertjax.atomic",
    "bertjax.storage",
    "bertjax.config",
    "bertjax.data",
    "bertjax.model",
    "bertjax.parallel",
    "bertjax.metrics",
    "bertjax.train",
  ),
  # Exports of fine-tuned models read their task (classes, head) from bertjax.finetune.
  "bertjax.hf": (
    "bertjax.errors",
    "bertjax.tasks",
    "bertjax.atomic",
    "bertjax.storage",
    "bertjax.config",
    "bertjax.data",
    "bertjax.model",
    "bertjax.train",
    "bertjax.finetune",
  ),
  "bertjax.perf": (
    "bertjax.errors",
    "bertjax.config",
    "bertjax.data",
    "bertjax.model",
    "bertjax.parallel",
    "bertjax.metrics",
    "bertjax.train",
  ),
  "bertjax.cli": ("bertjax",),
  "bertjax.__main__": ("bertjax.cli",),
  "bertjax": (),  # the package's __init__: its version, nothing else
}
# Third-party packages a part must not import (directly or through what it imports).
# (The config may reach jax through the model's sizes, which ask it for the platform when resolving
# `auto`; importing the config still loads no jax, as the run-time test shows.)
FORBIDDEN_THIRD_PARTY = {
  "bertjax.data": ("flax", "jax", "optax", "orbax"),
  "bertjax.config": ("flax", "optax", "orbax"),
}


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
  """Every module name `path` imports, absolute. `from X import Y` counts as X.Y when that is a
  module of bertjax (X is then only its package, whose __init__ imports nothing: tested below),
  else as X."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      submodules = {f"{base}.{alias.name}" for alias in node.names} & set(MODULE_PATHS)
      found |= submodules or {base}
      if len(submodules) < len(node.names):
        found.add(base)
  return found


MODULE_PATHS = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES = MODULE_PATHS
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}
THIRD_PARTY = {
  name: {m.split(".")[0] for m in _imports(path) if not m.startswith("bertjax")} for name, path in MODULES.items()
}


def _part(module: str) -> str:
  """The longest ALLOWED key that `module` belongs to."""
  return max((key for key in ALLOWED if module == key or module.startswith(key + ".")), key=len)


def _closure(module: str) -> set[str]:
  seen, todo = set(), [module]
  while todo:
    for dep in GRAPH[todo.pop()] - seen:
      seen.add(dep)
      todo.append(dep)
  return seen


def test_the_contract_covers_every_module():
  assert len(MODULES) > 40
  for module in MODULES:
    assert _part(module), module


def test_there_are_no_import_cycles():
  cycles = []

  def visit(module, stack):
    for dep in sorted(GRAPH[module]):
      if dep in stack:
        cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
      elif len(stack) < 20:
        visit(dep, stack + [dep])

  for module in MODULES:
    visit(module, [module])
  assert not cycles, sorted(set(cycles))[:5]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_the_layers_below_its_own(module):
  part = _part(module)
  allowed = ALLOWED[part]
  wrong = [
    dep
    for dep in GRAPH[module]
    if dep != "bertjax"  # the root package: the version, nothing else
    and not (dep == part or dep.startswith(part + ".") or any(dep == a or dep.startswith(a + ".") for a in allowed))
  ]
  assert not wrong, f"{module} ({part}) imports {wrong}; it may import {allowed}"


@pytest.mark.parametrize("part", sorted(FORBIDDEN_THIRD_PARTY))
def test_the_input_pipeline_and_the_config_pull_in_no_model_code(part):
  for module in (m for m in MODULES if _part(m) == part):
    reached = {module} | _closure(module)
    pulled = {lib for m in reached for lib in THIRD_PARTY[m]} & set(FORBIDDEN_THIRD_PARTY[part])
    assert not pulled, f"{module} imports {sorted(pulled)} (through {sorted(reached)})"


def test_nothing_in_the_package_imports_the_experiment_configs():
  offenders = [
    m for m, path in MODULES.items() if any(i == "configs" or i.startswith("configs.") for i in _imports(path))
  ]
  assert not offenders


def test_the_subpackage_inits_import_nothing():
  """So importing one module of a part never drags in its siblings."""
  for name, path in MODULES.items():
    if path.name == "__init__.py" and name != "bertjax":
      assert not _imports(path), name


def test_no_module_is_a_grab_bag():
  assert not [p for p in PACKAGE.rglob("*.py") if p.stem in ("utils", "helpers", "misc", "common")]


def test_importing_the_pipeline_and_the_config_loads_neither_jax_nor_the_model():
  """The same rule at run time: what `import` really executes, package __init__s included."""
  code = (
    "import sys; import bertjax.data.pipeline, bertjax.data.preview, bertjax.data.bench, "
    "bertjax.config.loading; "
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax', 'orbax') "
    "or m.startswith(('bertjax.model.bert', 'bertjax.parallel.rules', 'bertjax.train'))))"
  )
  env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"
