"""Writing files so that a reader never sees half of one: every writer goes through a temporary
file (or directory) beside the target and renames it into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, BinaryIO, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """A temporary path beside `path` for a writer that wants a file name (a compiler, a library);
  whatever is there when the block completes is renamed to `path`, and removed if it fails."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=directory)
  os.close(fd)
  try:
    yield tmp
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)         # mkstemp's 0600 -> the usual permissions
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
  """A binary file to write; it appears at `path` only when the block completes."""
  with atomic_path(path) as tmp, open(tmp, 'wb') as f:
    yield f


def atomic_write(path: str | os.PathLike, data: str | bytes) -> str:
  """Writes `data` (text or bytes) to `path` atomically; returns the path."""
  with atomic_open(path) as f:
    f.write(data.encode() if isinstance(data, str) else data)
  return os.fspath(path)


def write_json(path: str | os.PathLike, obj: Any) -> str:
  return atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + '\n')


def savez(path: str | os.PathLike, **arrays: np.ndarray) -> str:
  """`np.savez` to `path` (which should end in .npz) atomically."""
  with atomic_open(path) as f:
    np.savez(f, **arrays)
  return os.fspath(path)


def savefig(fig, path: str | os.PathLike, **kwargs) -> str:
  """A matplotlib figure to `path` (format from the extension) atomically."""
  with atomic_open(path) as f:
    fig.savefig(f, format=os.fspath(path).rsplit('.', 1)[-1], **kwargs)
  return os.fspath(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory beside `path`; on success it becomes `path` (an existing one
  is replaced only with `overwrite`, and only after the new one is complete), on failure it is
  removed and `path` is left as it was."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} already exists')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(path) + '.', dir=parent)
  try:
    yield tmp
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix='.' + os.path.basename(path) + '.old.', dir=parent)
      os.replace(path, os.path.join(old, 'previous'))
    os.replace(tmp, path)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
