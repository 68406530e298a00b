"""Files in and out. Writing: a reader never sees half of a file, as every writer goes through a
temporary file (or directory) beside the target and renames it into place. Reading untrusted
pickles: `load_pickle` admits numpy arrays and plain containers only, so a file cannot run code
when read."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
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


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def file_digests(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, str]:
  """SHA-256 of every file below `folder` by '/'-joined relative path (but those in `skip`)."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/')
      if rel not in skip:
        out[rel] = sha256_file(os.path.join(root, name))
  return dict(sorted(out.items()))


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


# ---- untrusted pickles -------------------------------------------------------------------------

class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a class outside the admitted set (numpy arrays, dtypes and scalars;
  dict, list, tuple, str, bytes, numbers)."""


# (module, name) pairs a data pickle may reference: how numpy (1.x and 2.x, pickle protocols
# 2-5) writes arrays, dtypes and scalars, and the plain containers. Each of these only builds
# data; none can call back into arbitrary code.
_ADMITTED = {
    **{(m, n): None for m in ('numpy.core.multiarray', 'numpy._core.multiarray')
       for n in ('_reconstruct', 'scalar')},
    **{(m, '_frombuffer'): None for m in ('numpy.core.numeric', 'numpy._core.numeric')},
    ('numpy', 'ndarray'): None, ('numpy', 'dtype'): None,
    ('_codecs', 'encode'): None,                   # protocol 2 writes bytes through it
    ('collections', 'OrderedDict'): None,
    **{('builtins', n): None for n in ('dict', 'list', 'tuple', 'set', 'frozenset', 'str',
                                       'bytes', 'bytearray', 'int', 'float', 'complex', 'bool')},
    **{('__builtin__', n): None for n in ('dict', 'list', 'tuple', 'set', 'frozenset', 'str',
                                          'bytes', 'bytearray', 'int', 'float', 'complex',
                                          'bool', 'unicode', 'long')},
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, name: str):
    super().__init__(file)
    self._name = name

  def find_class(self, module: str, name: str):
    if (module, name) not in _ADMITTED:
      raise UnsafePickleError(
          f'{self._name}: refused to load {module}.{name}: only numpy arrays and dtypes, dicts, '
          'lists, tuples, strings and numbers are read from a pickle (a pickle can run code when '
          'loaded; convert the file to plain arrays)')
    return super().find_class(module, name)


def load_pickle(source: str | os.PathLike | bytes) -> Any:
  """Unpickle a file (or bytes) admitting only data: numpy arrays, dtypes and scalars, dict,
  list, tuple, str, bytes and numbers. Anything else raises `UnsafePickleError` naming the file
  and the class the pickle asked for, before that class is touched."""
  if isinstance(source, bytes):
    return _RestrictedUnpickler(io.BytesIO(source), 'pickle').load()
  with open(source, 'rb') as f:
    return _RestrictedUnpickler(f, os.fspath(source)).load()
