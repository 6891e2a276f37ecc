"""`bertjax <command>`: parses, validates, dispatches. No logic lives here.

A user error (a BertjaxError, a bad flag) prints one line and exits with status 2; nothing
else is printed, no traceback.
"""

import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence

from bertjax.cli import commands, stores
from bertjax.cli import parser as parser_lib
from bertjax.errors import BertjaxError

EXIT_USER_ERROR = 2
# At exit Python joins every non-daemon thread. Libraries start some (orbax's commit threads,
# concurrent.futures workers) that, when an object store stopped answering, keep retrying for
# many minutes after bertjax has already reported the failure and released what it holds.
EXIT_GRACE_S = 30.0


def _exit_within(seconds: float, code: int) -> None:
  """End the process with `code` if the interpreter's own exit has not finished in `seconds`."""

  def end():
    time.sleep(seconds)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

  threading.Thread(target=end, name="bertjax-exit-watchdog", daemon=True).start()


def run() -> None:
  """The program (`bertjax`, `python -m bertjax`): `main`, then an exit that cannot hang."""
  code = main()
  if threading.active_count() > 1:  # threads left behind: the exit must not wait on them forever
    _exit_within(EXIT_GRACE_S, code)
  sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  # transformers (export's tokenizer converter) announces at import that torch is absent.
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  try:
    rest, overrides = parser_lib.split_overrides(argv)
    parser = parser_lib.build_parser()
    args = parser.parse_args(rest)
    if args.command is None:
      parser.print_help()
      return EXIT_USER_ERROR
    name = " ".join(
      filter(None, (args.command, getattr(args, "tokenizer_command", None), getattr(args, "data_command", None)))
    )
    if overrides and "config" not in vars(args):
      raise BertjaxError(f"{name}: takes no --config.KEY=VALUE overrides")
    commands.setup_logging()
    stores.check_flags(args)  # gs:// flags: bucket and credentials, before any work
    return commands.COMMANDS[name](args, overrides) or 0
  except BertjaxError as e:
    print(f"bertjax: error: {e}", file=sys.stderr)
    # Work a failed step left in flight (a checkpoint write's coroutines) is dropped on purpose; at
    # exit Python would warn about it after the error line, which must stay the last thing printed.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print("bertjax: interrupted", file=sys.stderr)
    return 130
