"""`python -m bertjax` is the `bertjax` command."""

from bertjax.cli.main import run

if __name__ == "__main__":
  run()
