"""Native CPU kernels: built on first use, registered with the XLA FFI.

`csrc/attention_cpu.cc` is a fused attention (forward and backward) for XLA:CPU: one query row's
scores stay in L1 from the score product to the value product, where XLA streams each (Tq, Tk)
pass through memory. It computes the same function as the pure-JAX attention of
`dmd_jax.model.attention` (same hash dropout masks), which remains the path on GPU/TPU, for
other dtypes, and wherever the kernel is not available. Whether a model uses it is
`AttentionConfig.native`; this module only builds and loads it.

The library is built with the host's C++ compiler (`$CXX`, else `c++`/`g++`/`clang++`) for the
host CPU (`-march=native`) the first time it is needed, and cached under `$DMD_JAX_CACHE_DIR`
(default `~/.cache/dmd_jax`) by a hash of the source, compiler, flags, jaxlib version and CPU
features; later processes only load it (~5-15 s for the first build). Without a compiler,
everything runs in pure JAX; the reason is logged once (`kernel_status()`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from typing import Optional

import jax
import jaxlib

from dmd_jax.fileio import atomic_path

_SOURCE = os.path.join(os.path.dirname(__file__), 'csrc', 'attention_cpu.cc')
_FLAGS = ('-O3', '-march=native', '-fopenmp-simd', '-std=c++17', '-shared', '-fPIC',
          '-w')
TARGETS = {'forward': ('dmd_attention_forward', 'DmdAttentionForward'),
           'backward': ('dmd_attention_backward', 'DmdAttentionBackward')}

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def _compiler() -> Optional[str]:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_features() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          return line
  except OSError:
    pass
  return platform.processor()


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get('DMD_JAX_CACHE_DIR', '~/.cache/dmd_jax'))


def _build(cxx: str) -> str:
  """The cached shared library's path, compiling it first if needed (atomic rename, so a
  concurrent or interrupted build never leaves a partial file under the final name)."""
  with open(_SOURCE, 'rb') as f:
    source = f.read()
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True).stdout
  digest = hashlib.sha256(b'\0'.join(
      [source, cxx.encode(), version.encode(), ' '.join(_FLAGS).encode(),
       jaxlib.__version__.encode(), _cpu_features().encode()])).hexdigest()[:16]
  directory = cache_dir()
  path = os.path.join(directory, f'attention_cpu-{digest}.so')
  if os.path.isfile(path):
    return path
  with atomic_path(path) as tmp:
    cmd = [cxx, *_FLAGS, '-I', jax.ffi.include_dir(), _SOURCE, '-o', tmp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
      errors = [l for l in res.stderr.splitlines() if 'error' in l] or res.stderr.splitlines()
      raise RuntimeError(f'compiling {_SOURCE} failed ({" ".join(cmd)}): '
                         + '\n'.join(errors[:10]))
  return path


def load() -> bool:
  """Builds (or finds) and registers the kernels once per process; True when they are usable."""
  with _lock:
    if 'ok' in _state:
      return _state['ok']
    ok, why = False, ''
    if platform.system() != 'Linux' and platform.system() != 'Darwin':
      why = f'no native kernels on {platform.system()}'
    elif (cxx := _compiler()) is None:
      why = 'no C++ compiler found ($CXX, c++, g++, clang++)'
    else:
      try:
        lib = ctypes.CDLL(_build(cxx))
        for target, symbol in TARGETS.values():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform='cpu')
        ok, why, _state['lib'] = True, 'loaded', lib
      except Exception as e:   # a failed build falls back to pure JAX, with the reason logged
        why = f'{type(e).__name__}: {e}'
    if not ok:
      _log.warning('dmd_jax native CPU attention unavailable (%s); using pure JAX', why)
    _state.update(ok=ok, why=why)
    return ok


def kernel_status() -> str:
  """'loaded', or why the native kernels are not used (after the first `load()`)."""
  return _state.get('why', 'not loaded yet')
