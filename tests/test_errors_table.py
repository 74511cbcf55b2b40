"""docs/errors.md stays true to the tests: enough rows, and every cited test exists as cited.

The table is parsed as text and each cited ``tests/<file>.py::<test>[<id>]`` is checked against the test
file's syntax tree, without importing or running anything:
- the file exists and defines ``<test>`` (at module level or in a class);
- with a ``[<id>]``, ``<test>`` is parametrized and the id is one that pytest generates: one of the
  decorator's ``ids=``; else, when the argument values are a literal list (directly or through a module-level
  name), one of the ids computed from it as pytest does (strings as they are, numbers, bools and None by
  str(), ``<lambda>``, ``<argname><index>`` for other values); else one part per argument name joined by
  ``-``, each part of that form with its constant taken from the argument values' expressions.
"""
import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
WHERE = ("API", "CLI", "config", "data", "checkpoint", "run folder", "process")
CITATION = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[(.+)\])?`")


def cells(line: str) -> list[str]:
    """The cells of a markdown table row, split on unescaped pipes."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def table_rows() -> list[tuple[str, list[str]]]:
    """(section heading, cells) of every 4-column row that cites a test, in document order."""
    rows, section = [], None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            section = line[4:].strip()
        elif line.startswith("|"):
            row = cells(line)
            if len(row) == 4 and CITATION.search(row[3]):
                rows.append((section, row))
    return rows


ROWS = table_rows()


@lru_cache(maxsize=None)
def parsed(path: str) -> tuple[ast.Module, str]:
    source = (ROOT / path).read_text(encoding="utf-8")
    return ast.parse(source), source


def find_test(tree: ast.Module, name: str):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    return None


def parametrize_calls(func) -> list[ast.Call]:
    """The ``@pytest.mark.parametrize(...)`` decorators of ``func``, nearest to the function first."""
    calls = [d for d in func.decorator_list
             if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "parametrize"]
    return calls[::-1]


def argnames(call: ast.Call) -> list[str]:
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return [n.strip() for n in first.value.split(",") if n.strip()]
    return [e.value for e in first.elts]  # a list or tuple of names


def constants(tree: ast.Module, calls: list[ast.Call]) -> set[str]:
    """The ids pytest gives the scalar values written in the decorators' argument values, or in the
    module-level assignments of the names those use: strings as they are, numbers, bools and None by str()
    (with the sign of a negated literal)."""
    nodes = [call.args[1] for call in calls if len(call.args) > 1]
    used = {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}
    nodes += [stmt.value for stmt in tree.body if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value
              and {t.id for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                   if isinstance(t, ast.Name)} & used]
    found = set()
    for node in (n for root in nodes for n in ast.walk(root)):
        if isinstance(node, ast.Constant):
            found.add(node.value if isinstance(node.value, str) else str(node.value))
        elif (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
              and isinstance(node.operand.value, (int, float))):
            found.add(str(-node.operand.value))
    return found


def resolve(node: ast.AST, tree: ast.Module) -> ast.AST:
    """A module-level name's assigned value, and ``list(D)`` of a dict literal ``D`` as its keys."""
    if isinstance(node, ast.Name):
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id for t in stmt.targets):
                return resolve(stmt.value, tree)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "list"
            and len(node.args) == 1):
        inner = resolve(node.args[0], tree)
        if isinstance(inner, ast.Dict):
            return ast.List(elts=inner.keys)
    return node


def scalar_id(node: ast.AST, name: str, index: int) -> str:
    """The id pytest gives one parameter value (strings with non-ASCII characters and backslashes escaped)."""
    if isinstance(node, ast.Constant):
        value = node.value
        return value.encode("unicode_escape").decode("ascii") if isinstance(value, str) else str(value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return str(-node.operand.value)
    if isinstance(node, ast.Lambda):
        return "<lambda>"
    return f"{name}{index}"


def literal_ids(call: ast.Call, tree: ast.Module) -> list[str] | None:
    """Every id of a parametrize whose argument values are a literal list (directly or through a module-level
    name), or None when they are computed."""
    values = resolve(call.args[1], tree) if len(call.args) > 1 else None
    if not isinstance(values, (ast.List, ast.Tuple)):
        return None
    names = argnames(call)
    ids = []
    for index, element in enumerate(values.elts):
        items = element.elts if len(names) > 1 and isinstance(element, (ast.List, ast.Tuple)) else [element]
        if len(items) != len(names):
            return None
        ids.append("-".join(scalar_id(item, name, index) for item, name in zip(items, names)))
    return ids


def id_can_be_generated(test_id: str, names: list[str], values: set[str]) -> bool:
    """Whether ``test_id`` splits at ``-`` into one valid part per argument name (parts may contain ``-``)."""
    def part_ok(part: str, name: str) -> bool:
        return part in values or part == "<lambda>" or re.fullmatch(re.escape(name) + r"\d+", part) is not None

    def split(rest: str, k: int) -> bool:
        if k == len(names) - 1:
            return part_ok(rest, names[k])
        return any(part_ok(rest[:i], names[k]) and split(rest[i + 1:], k + 1)
                   for i, ch in enumerate(rest) if ch == "-")

    return split(test_id, 0)


def test_the_table_has_at_least_40_rows_each_under_its_own_where():
    assert len(ROWS) >= 40, len(ROWS)
    for section, (where, bad_input, error, _) in ROWS:
        assert where in WHERE, where
        assert section == where, (section, where, bad_input)  # grouped by where
        assert bad_input and "`" in error, (bad_input, error)  # the message itself, as a code span
        assert re.search(r"`\w+(Error|Warning)`|\bexit(s)? \d+|on stderr", error), error
    assert {where for _, (where, *_rest) in ROWS} == set(WHERE)
    assert len({tuple(row[:2]) for _, row in ROWS}) == len(ROWS), "a (where, bad input) pair is listed twice"


@pytest.mark.parametrize("path, name, test_id", sorted({m.groups() for _, row in ROWS
                                                        for m in CITATION.finditer(row[3])},
                                                       key=lambda g: (g[0], g[1], g[2] or "")))
def test_every_cited_test_exists_as_cited(path, name, test_id):
    assert (ROOT / path).is_file(), f"{path} does not exist"
    tree, _ = parsed(path)
    func = find_test(tree, name)
    assert func is not None, f"{path} defines no {name}"
    calls = parametrize_calls(func)
    if test_id is None:
        return
    assert calls, f"{path}::{name} is not parametrized, but docs/errors.md cites [{test_id}]"
    ids = [kw.value for call in calls for kw in call.keywords if kw.arg == "ids"]
    if ids and all(isinstance(v, (ast.List, ast.Tuple)) for v in ids):
        given = {e.value for v in ids for e in v.elts if isinstance(e, ast.Constant)}
        assert test_id in given, f"[{test_id}] is not among the ids {sorted(given)} of {path}::{name}"
        return
    if len(calls) == 1 and literal_ids(calls[0], tree) is not None:
        generated = literal_ids(calls[0], tree)
        assert test_id in generated, f"[{test_id}] is not among the ids {generated} of {path}::{name}"
        return
    names = [n for call in calls for n in argnames(call)]
    assert id_can_be_generated(test_id, names, constants(tree, calls)), (
        f"[{test_id}] is not an id pytest can generate for {path}::{name} (arguments {names})")


@pytest.mark.parametrize("test_id, valid", [
    ("steps-zero", True),                       # one argument: a string constant of the file
    ("argv3-config key 'features' expects an int, got '3.5'", True),
    ("argv3-expects a float", False),           # a message that is not in the file
    ("x3-config key 'features' expects an int, got '3.5'", False),  # not an argument name
    ("steps-zero-extra", False),                # more parts than arguments
])
def test_the_id_check_itself(test_id, valid):
    values = {"steps-zero", "config key 'features' expects an int, got '3.5'"}
    names = ["case"] if test_id.startswith("steps") else ["argv", "message"]
    assert id_can_be_generated(test_id, names, values) is valid
