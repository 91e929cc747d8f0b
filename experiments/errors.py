r"""One-line errors for the command-line programs.

A user error ends a program with one line on stderr, ``error: ...``, naming the
problem and its fix, and exit status 2; no traceback. User errors are the types the
library raises for bad input: ValueError (bad values, unknown criteria or options,
`checkpoint.CheckpointMismatchError`, stale caches), FileNotFoundError (no trained
model, `data.DataNotFoundError`), any other OSError (a file that cannot be written:
the message names it) and absl's `app.UsageError`. absl's flag-parsing errors (an
unknown flag, a non-integer for an integer flag, a value outside an enum, a missing
required flag) get the same one line. ``--verbose`` (or absl's ``-v N`` /
``--verbosity=N``) prints the traceback before that line. Anything else (a bug) keeps
its traceback.

Use in a program:

  from experiments import errors

  def main(argv):
    workdir = errors.check_workdir(_WORKDIR.value, write=True)  # Flags first, before
    sizes = errors.positive_ints("batch_sizes", _BATCHES.value)  # any model or data.
    ...

  if __name__ == "__main__":
    errors.run(main)
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of an error.")

USER_ERRORS = (ValueError, OSError, app.UsageError)
EXIT_STATUS = 2


def fail(message: str) -> NoReturn:
  """Ends the program: ``error: message`` (one line) on stderr, exit status 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(EXIT_STATUS)


def message(e: BaseException) -> str:
  """The one-line text of a user error. An OSError with a file name (a failed write,
  an unreadable file) says which path and what to do; the rest are their own text."""
  if isinstance(e, OSError) and e.filename is not None:
    return (f"cannot write or read {e.filename}: {e.strerror or e}. Make it writable (or "
            f"free space), or pass another --workdir.")
  return str(e) or type(e).__name__


def _verbose() -> bool:
  f = flags.FLAGS
  return f.is_parsed() and (f.verbose or f["verbosity"].present)


def _parse(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors as one line and exit status 2.

  A config file's own error (an unknown variant) arrives inside the flag error with
  its traceback: only its last line is kept. Overriding a field a config lacks
  (``--config.nofield=1``) raises AttributeError from ml_collections' parser.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:
      head = text.split(":", 1)[0]
      last = [line for line in text.splitlines() if line.strip()][-1]
      text = f"{head}: {last.strip()}"
    fail(f"{text} (see --helpfull)")
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], BaseException):  # ConfigDict nests KeyErrors.
      e = e.args[0]
    name, *hint = str(e.args[0] if e.args else e).strip('"').splitlines()
    hint = f" ({hint[0].strip()})" if hint else ""
    fail(f"unknown config field {name}{hint}: see the config file's fields, or --helpfull.")


def guard(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main` with user errors (`USER_ERRORS`) turned into one line and exit status 2."""
  @functools.wraps(main)
  def guarded(argv: list[str]) -> Any:
    try:
      return main(argv)
    except USER_ERRORS as e:
      if _verbose():
        traceback.print_exc()
      fail(message(e))
  return guarded


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with one-line user errors (flag parsing included)."""
  app.run(guard(main), flags_parser=_parse)


def check_workdir(workdir: str, *, write: bool) -> str:
  """`workdir` if it is an existing directory (writable, with `write`); else a ValueError
  saying what is wrong with ``--workdir``. Run before loading anything."""
  if not os.path.exists(workdir):
    raise ValueError(f"--workdir={workdir} does not exist: pass the directory "
                     f"python -m experiments.train wrote.")
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory: pass the directory "
                     f"python -m experiments.train wrote.")
  if write and not os.access(workdir, os.W_OK):
    raise ValueError(f"--workdir={workdir} is not writable and results are written there: "
                     f"make it writable, or copy it and pass the copy.")
  return workdir


def check_output(path: str, flag: str) -> str:
  """`path` if its folder exists and is writable; else a ValueError naming `flag`."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
    raise ValueError(f"--{flag}={path}: cannot write there ({folder} is missing or not "
                     f"writable); pass a path in a writable folder.")
  return path


def positive_ints(flag: str, values: Sequence[str]) -> list[int]:
  """A list flag's items as integers >= 1; else a ValueError naming `flag`."""
  try:
    ints = [int(v) for v in values]
  except ValueError:
    ints = []
  if not ints or min(ints) < 1:
    raise ValueError(f"--{flag} takes positive integers separated by commas (e.g. "
                     f"--{flag}=1,256); got {','.join(values)!r}.")
  return ints


def floats(flag: str, values: Sequence[str]) -> list[float]:
  """A list flag's items as floats; else a ValueError naming `flag`."""
  try:
    return [float(v) for v in values]
  except ValueError:
    raise ValueError(f"--{flag} must be numbers; got {','.join(values)}.") from None


def at_least(flag: str, value: float, minimum: float) -> float:
  """`value` if >= `minimum`; else a ValueError naming `flag`."""
  if value < minimum:
    raise ValueError(f"--{flag} must be at least {minimum}; got {value}.")
  return value


def key_values(flag: str, items: Sequence[str]) -> dict[str, str]:
  """["KEY=VALUE", ...] -> {KEY: VALUE}; a ValueError naming `flag` for an item without '='."""
  options = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--{flag} takes KEY=VALUE (e.g. --{flag}=conv_impl=xla); got {item!r}.")
    options[key] = value
  return options


def check_model(name: str) -> None:
  """A UsageError naming the registered networks unless `name` (``--model``) is one."""
  from bnet_jax import nets  # Only here: the flag checks above need no JAX.

  if name not in nets.names():
    raise app.UsageError(f"--model={name} is not a registered network; registered: "
                         f"{', '.join(nets.names())}.")


def check_network(flag: str, build: Callable[[], Any]) -> None:
  """Builds a network with `build` and traces its initialisation (shapes only: nothing
  compiled, no weights), so an unknown option or layer implementation given with
  `flag` is a ValueError before any work starts."""
  import jax  # Only here: the flag checks above need no JAX.

  from bnet_jax import nets

  try:
    net = build()
    jax.eval_shape(lambda: nets.init(net, jax.random.key(0)))
  except (ValueError, TypeError) as e:
    raise ValueError(f"--{flag}: {e}") from e
