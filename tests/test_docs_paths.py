"""Every file path and module the documentation names exists: README.md, docs/*.md and infra/**/*.md name
repository paths (``pconv/...py``, ``pipelines/...``, ``benchmarks/...``, ``docs/...``, ``configs/...``,
``infra/...``, ``tests/...``), dotted modules and names (``pconv.x.y[.name]``), README's repository layout and its
"paper in the code" table; a move or rename that leaves one behind fails here, naming the document and the line.

Placeholders are allowed where a path stands for many: ``X`` / ``<command>`` (one file of that folder) and globs.
A dotted ``pconv.x`` that is not a module may be a name the code itself uses as a string (an MLflow tag such as
``pconv.conv``).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "infra").rglob("*.md")])
PREFIXES = ("pconv", "pipelines", "benchmarks", "docs", "configs", "infra", "tests")
PATH = re.compile(r"(?<![\w./~:-])((?:{})/[\w./*<>-]*)".format("|".join(PREFIXES)))
DOTTED = re.compile(r"(?<![\w./-])pconv(?:\.[A-Za-z_]\w*)+")
PLACEHOLDER = re.compile(r"^(?:<[^>]*>|[A-Z])(\.\w+)?$")  # <command>.py, X.py, X


def _where(doc: Path, text: str, index: int) -> str:
    return f"{doc.relative_to(REPO)}:{text.count(chr(10), 0, index) + 1}"


def _exists(path: str) -> bool:
    parts = [("*" + (m.group(1) or "")) if (m := PLACEHOLDER.match(p)) else p for p in path.rstrip("/").split("/")]
    pattern = "/".join(parts)
    if any(c in pattern for c in "*?["):
        return any(REPO.glob(pattern))
    return (REPO / pattern).exists()


def _checked(path: str) -> bool:
    """pconv/ paths are checked when they name a file or a folder (pconv/mlflow is a secret's name, not a path)."""
    if path.startswith("pconv/"):
        return path.endswith("/") or bool(re.search(r"\.\w+$", path))
    return True


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_paths_named_in_the_docs_exist(doc):
    text = doc.read_text()
    missing = []
    for m in PATH.finditer(text):
        path = m.group(1).rstrip(".,;:)")
        if _checked(path) and not _exists(path):
            missing.append(f"{_where(doc, text, m.start())}: {path}")
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)


@cache
def _modules() -> dict[str, Path]:
    out = {}
    for p in (REPO / "pconv").rglob("*.py"):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


@cache
def _defined(path: Path) -> frozenset[str]:
    """Names a module defines or imports at module level, and the attributes and methods of its classes."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


@cache
def _string_constants() -> frozenset[str]:
    return frozenset(n.value for p in _modules().values() for n in ast.walk(ast.parse(p.read_text()))
                     if isinstance(n, ast.Constant) and isinstance(n.value, str))


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    modules = _modules()
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if module in modules:
            rest = [p for p in parts[i:] if not PLACEHOLDER.match(p)]
            if i < len(parts) and PLACEHOLDER.match(parts[i]):
                return True  # pconv.commands.X.main: any command module
            if all(name in _defined(modules[module]) for name in rest[:2]):
                return True
            break
    return dotted in _string_constants()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_modules_named_in_the_docs_exist(doc):
    text = doc.read_text()
    missing = [f"{_where(doc, text, m.start())}: {m.group(0)}" for m in DOTTED.finditer(text)
               if not _resolves(m.group(0).rstrip("."))]
    assert not missing, "no such module or name in pconv:\n" + "\n".join(missing)


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    assert f"\n{title}\n" in text, f"README has no '{title}' section"
    return text.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0]


def _layout() -> tuple[list[str], int]:
    """README's repository layout (a tree in a code block) as repository paths, and how many entries it read."""
    block = _readme_section("## Repository layout").split("```", 2)[1]
    stack: list[tuple[int, str]] = []
    paths: list[str] = []
    for line in block.splitlines()[1:]:
        m = re.match(r"^( *)(\S+)(?:\s{2,}|$)", line)
        if not m or not re.search(r"(/|\.\w+)$", m.group(2)) or len(m.group(1)) > 2 * (len(stack) + 1):
            continue  # a continuation line of the description
        indent, name = len(m.group(1)), m.group(2)
        stack = [(i, n) for i, n in stack if i < indent]
        paths.append("".join(n for _, n in stack) + name)
        if name.endswith("/"):
            stack.append((indent, name))
    return paths, len(paths)


def test_the_readme_layout_names_real_files():
    """Each entry of the layout tree, joined to the folders above it, exists."""
    paths, seen = _layout()
    assert seen > 20, f"could not read README's layout block ({seen} entries)"
    missing = [p for p in paths if not _exists(p)]
    assert not missing, f"README's repository layout names what does not exist: {missing}"


def test_the_readme_layout_lists_every_library_module():
    """A newcomer reads the layout to find a concern: every module of the stages is on it (the commands/ and the
    apps' helper modules are summarised on their package's line)."""
    listed = set(_layout()[0])
    summarised = ("pconv/commands/", "pconv/apps/")
    absent = sorted(p for p in (str(m.relative_to(REPO)) for m in (REPO / "pconv").rglob("*.py"))
                    if not p.endswith("__init__.py") and p not in listed and not p.startswith(summarised))
    assert not absent, f"modules missing from README's repository layout: {absent}"


def test_the_paper_in_the_code_table_names_real_definitions():
    """Each row names files and, after each file, names defined in it (`PConvUNet.freeze_encoder_bn`: the method)."""
    section = _readme_section("### The paper in the code")
    missing, rows = [], 0
    for line in section.splitlines():
        if not line.startswith("|") or "---" in line or line.startswith("| paper"):
            continue
        rows += 1
        cell = line.strip().strip("|").split("|")[-1]
        current: Path | None = None
        for token in re.findall(r"`([^`]+)`", cell):
            if token.startswith("pconv/"):
                current = REPO / token
                if not current.is_file():
                    missing.append(token)
                    current = None
            elif current is not None and re.fullmatch(r"[A-Za-z_][\w.]*", token):
                for name in token.split("."):
                    if name not in _defined(current):
                        missing.append(f"{current.relative_to(REPO)}: {token}")
                        break
    assert rows >= 6, f"could not read README's 'paper in the code' table ({rows} rows)"
    assert not missing, f"the table names what the code does not define: {missing}"
