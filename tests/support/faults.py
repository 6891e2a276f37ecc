"""`python -m tests.support.faults ERRNO STEP -- ARGS`: the real `bertjax ARGS`, on a storage that
fails the way the operating system does while checkpoint STEP is written.

Every file orbax writes through its async path layer into that step's temporary folder raises
`OSError(ERRNO)` with the OS's own message, as a full disk (ENOSPC) or a file system remounted
read-only (EROFS) would. Nothing in bertjax knows about it: this wraps orbax's module function
`orbax.checkpoint._src.path.async_path.write_text` (commit markers and metadata files) before the
CLI starts. Should orbax move that function, the wrapper fails loudly here instead of injecting
nothing.
"""

import errno
import os
import sys


def main(argv: list[str]) -> int:
  name, step, separator, *args = argv
  assert separator == "--", "usage: python -m tests.support.faults ERRNO STEP -- ARGS"
  code = getattr(errno, name)
  from orbax.checkpoint._src.path import async_path

  real_write_text = async_path.write_text
  step_tmp = f"{os.sep}{step}.orbax-checkpoint-tmp"

  async def write_text(path, text):
    if step_tmp in str(path):
      raise OSError(code, os.strerror(code), str(path))
    return await real_write_text(path, text)

  async_path.write_text = write_text
  from bertjax.cli.main import main as bertjax_main

  return bertjax_main(args)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
