"""The one user-facing error type.

A `BertjaxError` means the user gave something the program cannot work with (a config value, a
path, a file). Its message names the input and the fix; the CLI prints it as one line and exits
with status 2. Anything else that escapes is a bug and keeps its traceback.
"""


class BertjaxError(Exception):
  """A user error: the message names the input and how to fix it."""
