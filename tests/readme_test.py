"""What README.md shows runs as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_the_python_snippet_runs_as_written():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  assert len(blocks) == 1
  scope = {}
  exec(compile(blocks[0], 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  edges = np.asarray(scope['aux']['outputs']['edges_homo'])
  assert edges.shape == (2, 3, 3) and np.isfinite(float(scope['total']))
