"""`bertjax <command>`: the command line.

parser.py    the commands, their flags and `--config.KEY=VALUE` overrides
commands.py  one function per command: loads and validates the config, calls the library
main.py      the entry point: parses, dispatches, turns a user error into one line and exit 2
"""
