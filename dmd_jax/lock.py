"""One process at a time per run folder and per prepared dataset: `hold(path, what)`.

A lock is a file locked with `flock`, so the kernel releases it when its holder exits in any way
(a SIGKILL included) and a crashed run never blocks the next one. The file names its holder
(pid, host, start time, command) for the message a second process gets; a lock file left by a
holder that is gone is reported as stale and taken over. The holder removes the file when it
is done. Locks are advisory and per host: on a network file system without `flock` they do
not exclude other hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable, Iterator, Optional


class Busy(RuntimeError):
  """Another process holds the lock."""


def _holder(fd: int) -> dict:
  try:
    raw = os.pread(fd, 4096, 0)
    return json.loads(raw.decode()) if raw else {}
  except (OSError, ValueError):
    return {}


def describe(holder: dict) -> str:
  if not holder:
    return 'another process'
  since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))
  return f"pid {holder.get('pid')} on {holder.get('host')} (since {since}: {holder.get('command')})"


def _alive(holder: dict) -> bool:
  """Whether the process a lock file names may still run (unknown hosts count as alive)."""
  if holder.get('host') != socket.gethostname():
    return True
  try:
    os.kill(int(holder.get('pid', -1)), 0)
  except ProcessLookupError:
    return False
  except (OSError, ValueError):
    return True
  return True


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str, *, wait: bool = False,
         log: Optional[Callable[[str], None]] = None) -> Iterator[None]:
  """Holds the lock file `path` (for `what`, e.g. 'run folder /x') inside the block.

  If another process holds it: `wait=False` raises `Busy` naming the holder; `wait=True` says
  so through `log` and waits for it.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      if not wait:
        os.close(fd)
        raise Busy(f'{what} is in use by {describe(holder)}; wait for it to finish or use '
                   f'another folder (lock file {path})') from None
      if log:
        log(f'waiting for {describe(holder)}, which holds {what} (lock file {path})')
      fcntl.flock(fd, fcntl.LOCK_EX)
    # The file may have been removed (by its holder, when done) between our open and lock: then
    # the lock we got is on a file no one else will find; take the one at `path` instead.
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    stale = _holder(fd)
    if stale and log and not _alive(stale):
      log(f'{what}: took over the stale lock of {describe(stale)}, which is no longer running')
    record = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'since': time.time(),
                         'command': ' '.join(sys.argv)[:300]}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    yield
  finally:
    with contextlib.suppress(OSError):
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        os.unlink(path)
    os.close(fd)
