"""The package stays readable: modules of one job, functions that fit on a screen.

A module over MAX_MODULE_LINES or a function body (its docstring aside) over
MAX_FUNCTION_LINES is split where it lives, not exempted here.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bertjax"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
  body = node.body
  if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
    body = body[1:]  # the docstring
  return node.end_lineno - body[0].lineno + 1


def test_every_module_is_under_the_line_limit():
  long = {
    str(p.relative_to(PACKAGE)): n
    for p in PACKAGE.rglob("*.py")
    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
  }
  assert not long, long


def test_every_function_body_fits_on_a_screen():
  long = {}
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(node) > MAX_FUNCTION_LINES:
        long[f"{path.relative_to(PACKAGE)}:{node.name}"] = _body_lines(node)
  assert not long, long
