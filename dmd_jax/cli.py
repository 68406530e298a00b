"""What every command does with a user's mistake: one line on stderr, `error: ...`, exit status 2.

    from dmd_jax import cli
    if __name__ == '__main__':
      cli.run(main)

Mistakes are the flags and config fields on the command line, paths, and the inputs named in
them: `flags.Error` and the config overrides' errors while parsing, and `USER_ERRORS` raised by
`main`. `--traceback` shows the whole Python traceback instead. Anything else (a bug) keeps its
traceback.
"""

from __future__ import annotations

import ast
import contextlib
import sys
from typing import Callable, NoReturn

from absl import app, flags, logging

from dmd_jax.lock import Busy

# ValueError covers the named errors of validation, of data and input checks (MmsaFormatError,
# UnicodeDecodeError) and of run folders (RunFolderMismatch).
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError, Busy)

_TRACEBACK = flags.DEFINE_bool('traceback', False, 'On an error, show the whole traceback.')


def one_line(message) -> str:
  """The message of an exception (unwrapped from the exceptions wrapping it) on one line."""
  while isinstance(message, BaseException) and len(message.args) == 1:
    message = message.args[0]
  text = str(message)
  if len(text) > 1 and text[0] == text[-1] == "'":   # a quoted repr (a KeyError's message)
    with contextlib.suppress(ValueError, SyntaxError):
      text = str(ast.literal_eval(text))
  return ' '.join(text.split())


def fail(message: str) -> NoReturn:
  print(f'error: {one_line(message)}', file=sys.stderr)
  sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # --config.<field>=<value>
    if '--traceback' in argv:
      raise
    fail(f'bad --config override: {one_line(e)}')


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with user errors as one line and exit status 2."""
  def wrapped(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)   # orbax/TFDS INFO chatter; --verbosity=0 shows it
    try:
      return main(argv)
    except app.UsageError as e:
      fail(e)
    except USER_ERRORS as e:
      if _TRACEBACK.value:
        raise
      fail(e)
  app.run(wrapped, flags_parser=_parse)
