"""The package map, checked on the source.

The map (the same in ``pconv/__init__.py``, each package's ``__init__`` docstring, README's Architecture section and
``../shared/ARCHITECTURE.md``'s table; :func:`test_the_map_is_the_same_everywhere` keeps them equal): the packages
under ``pconv/`` are the pipeline's stages, and imports flow one way, from a stage to the stages it builds on::

    core        the paper (layers, U-Net, loss, masks, metrics, SR grid, image decode, config)  imports nothing
    storage     URIs, atomic writes, file sets, the shard format                                   core
    cluster.py  the cluster the autoscaler can make, the one way to join Ray                       nothing
    ingest      sources -> shards                                                                  core storage cluster
    data        training input                                                                     core storage cluster
    tracking    MLflow runs, checkpoints, registry, model URI -> model                             core storage
    train       driver, worker loop, train state                                                   + data tracking
    inference   inpaint / super-resolve, batch, serve, the pyfunc model                            + tracking
    evaluation  paper protocol, SR vs bicubic, promotion                                           + inference
    apps        applications of the library (demo, local S3)                                       any library package
    commands    one parser + main per `pconv` command                                              library + apps
    pipelines/  shims for `ray job submit -- python pipelines/X.py`                                pconv.commands only

Every rule says why it exists. Imports are read with ``ast`` at every depth (module level, inside functions, under
``TYPE_CHECKING``, ``importlib.import_module("pconv...")``), so a lazy import cannot hide a back-flow; each failure
names the file, the line and the rule.
"""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PCONV = REPO / "pconv"
ARCHITECTURE_MD = REPO.parent / "shared" / "ARCHITECTURE.md"

# ------------------------------------------------------------------------------------------------ the map
# The library: every stage a training or serving run uses. Nothing in it imports commands/ or apps/.
LIBRARY = ("core", "storage", "cluster", "ingest", "data", "tracking", "train", "inference", "evaluation")
EDGES = ("apps", "commands")  # what is built on the library: applications, and the command line over everything

# package -> the packages it may import (besides itself), and why
MAY_IMPORT: dict[str, frozenset[str]] = {
    # The paper must be readable, testable and importable anywhere (a notebook, a pyfunc model, a unit test)
    # without a cluster or a tracking server: it depends on no other stage.
    "core": frozenset(),
    # Where bytes live: the shard format validates rows with the paper's mask rules.
    "storage": frozenset({"core"}),
    # The cluster view is pure planning over Ray's state: every stage that runs on Ray asks it, it asks no one.
    "cluster": frozenset(),
    # Sources become shards: decode (core), write (storage), size the Ray Data job for the cluster (cluster).
    "ingest": frozenset({"core", "storage", "cluster"}),
    # Training input reads shards (storage) and plans its pools on the cluster; it knows nothing of training runs.
    "data": frozenset({"core", "storage", "cluster"}),
    # Runs, checkpoints and models are about files and the paper's model; not about how they were trained or used.
    "tracking": frozenset({"core", "storage"}),
    # Training consumes data and records through tracking; it never reaches forward into use (inference,
    # evaluation), so a training job cannot depend on the serving side.
    "train": frozenset({"core", "storage", "cluster", "data", "tracking"}),
    # Use of a trained model: loads it through tracking. The pyfunc model lives here (pconv/inference/pyfunc.py, a
    # deliberate deviation from ARCHITECTURE.md, which lists it under tracking): it calls the inpainting and SR
    # code, and tracking may not import inference.
    "inference": frozenset({"core", "storage", "cluster", "tracking"}),
    # The paper's evaluation scores what inference produces and promotes through the registry.
    "evaluation": frozenset({"core", "storage", "tracking", "inference"}),
    # Applications are compositions of library calls; they are not imported by the library, nor import commands.
    "apps": frozenset(LIBRARY),
    # A command parses arguments, makes one library call and maps errors to exit codes; `pconv demo` runs the demo
    # application (a second deviation from ARCHITECTURE.md, whose table says "any library package").
    "commands": frozenset(LIBRARY) | {"apps"},
}
PACKAGES = LIBRARY + EDGES
# pipelines/*.py stay importable by `ray job submit -- python pipelines/X.py`: a shim calls pconv.commands.X.main and
# holds no logic of its own, so the script and the installed `pconv X` cannot drift apart.
PIPELINES_MAY_IMPORT = "pconv.commands"
RAY_AND_MLFLOW = ("ray", "mlflow")


# ------------------------------------------------------------------------------------------------ reading the source
@dataclass(frozen=True)
class Import:
    target: str      # the imported module, absolute (a pconv submodule when a `from` names one)
    names: tuple[str, ...]  # the names taken from it (`from target import a, b`), or () for `import target`
    line: int
    top_level: bool  # executed when the module is imported (not inside a function or `if TYPE_CHECKING:`)


def _files() -> list[Path]:
    return sorted(p for p in PCONV.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in _files()}


def _package_of(module: str) -> str | None:
    """The map's unit of a pconv module: 'core', 'cluster', ... (None for the top-level pconv package itself)."""
    parts = module.split(".")
    if parts[0] != "pconv" or len(parts) == 1:
        return None
    if parts[1] == "__main__":  # `python -m pconv` is the command line
        return "commands"
    return parts[1]


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


@cache
def _imports(path: Path) -> tuple[Import, ...]:
    """Every import in ``path`` at any depth, with pconv targets resolved to the submodule they name."""
    module = _module_name(path) if path.is_relative_to(PCONV) else path.stem
    is_package = path.name == "__init__.py"
    known = set(_modules())
    found: list[Import] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not (
                isinstance(child, ast.If) and _dotted(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(alias.name, (), child.lineno, top))
            elif isinstance(child, ast.ImportFrom):
                base = (_resolve_relative(module, is_package, child.level, child.module) if child.level
                        else child.module or "")
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:  # `from pconv.data import stream`: the module pconv.data.stream
                        found.append(Import(sub, (), child.lineno, top))
                    else:
                        found.append(Import(base, (alias.name,), child.lineno, top))
            elif (isinstance(child, ast.Call) and _call_name(child.func) in ("importlib.import_module", "import_module",
                                                                             "__import__") and child.args):
                target = _literal_prefix(child.args[0])
                if target:
                    found.append(Import(target, (), child.lineno, top))
            visit(child, inner)

    visit(_tree(path), True)
    return tuple(found)


def _call_name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_call_name(func.value)}.{func.attr}"
    return ""


def _literal_prefix(node: ast.AST) -> str | None:
    """The constant module name of import_module("pconv.x") or f"pconv.commands.{name}" (its dotted prefix)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value).rstrip(".") or None
    return None


def _pconv_target(imp: Import) -> str | None:
    """The pconv module an import reaches (``pconv.x.y``), or None for a third-party / stdlib import."""
    return imp.target if imp.target == "pconv" or imp.target.startswith("pconv.") else None


def _violations(rule, paths) -> list[str]:
    return list(dict.fromkeys(f"{_rel(path)}:{imp.line}: {message}" for path in paths for imp in _imports(path)
                              if (message := rule(path, imp))))


# ------------------------------------------------------------------------------------------------ the layout
def test_ls_pconv_shows_the_stages():
    """A newcomer's `ls pconv/` is the pipeline: its folders are the map's packages, and nothing lies beside them
    but the package's own entry points (a flat module would be a stage nobody placed)."""
    entries = {p.name for p in PCONV.iterdir() if p.name != "__pycache__" and not p.name.startswith(".")}
    expected = {f"{p}.py" if p == "cluster" else p for p in PACKAGES} | {"__init__.py", "__main__.py", "py.typed"}
    assert entries == expected, (f"unexpected under pconv/: {sorted(entries - expected)}; "
                                 f"missing: {sorted(expected - entries)}")
    for package in PACKAGES:
        if package != "cluster":
            assert (PCONV / package / "__init__.py").is_file(), f"pconv/{package}/ has no __init__.py"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_package_direction(package):
    """Data flows one way and so do imports (see MAY_IMPORT for each package's reason); a back-flow is a cycle
    waiting to happen and couples a stage to one that is built on it."""
    allowed = MAY_IMPORT[package] | {package}

    def rule(path: Path, imp: Import) -> str | None:
        target = _pconv_target(imp)
        if target is None:
            return None
        dep = _package_of(target)
        if target == "pconv" and imp.names:  # `from pconv import x` that is no submodule: the top-level package
            return None
        if dep is not None and dep not in allowed:
            return (f"{package} imports {target} ({dep}); {package} may import "
                    f"{', '.join(sorted(MAY_IMPORT[package])) or 'nothing else of pconv'}")
        return None

    paths = [p for m, p in _modules().items() if _package_of(m) == package]
    assert paths, f"no module of package {package}"
    wrong = _violations(rule, paths)
    assert not wrong, "\n".join(wrong)


def test_the_top_level_package_imports_nothing_of_pconv_at_import_time():
    """`import pconv.core.layers` runs pconv/__init__.py first: if it imported a stage, the core would drag it in (a
    lazy attribute, PEP 562 ``__getattr__``, is fine: it imports on first use)."""
    wrong = [f"pconv/__init__.py:{i.line}: imports {i.target} at import time"
             for i in _imports(PCONV / "__init__.py") if i.top_level and _pconv_target(i)]
    assert not wrong, "\n".join(wrong)


def test_pipelines_are_shims_of_commands():
    """pipelines/X.py exist for `ray job submit -- python pipelines/X.py`: each calls pconv.commands.X.main and
    imports nothing else of pconv and nothing outside the standard library (no logic to drift from `pconv X`)."""
    paths = sorted((REPO / "pipelines").glob("*.py"))
    assert paths

    def rule(path: Path, imp: Import) -> str | None:
        target = imp.target
        if target == PIPELINES_MAY_IMPORT or target.startswith(PIPELINES_MAY_IMPORT + "."):
            return None
        if target.split(".")[0] in sys.stdlib_module_names or target == "__future__":
            return None
        return f"imports {target}; a pipeline shim may import only {PIPELINES_MAY_IMPORT} (and the standard library)"

    wrong = _violations(rule, paths)
    assert not wrong, "\n".join(wrong)
    for path in paths:
        called = {_call_name(n.func) for n in ast.walk(_tree(path)) if isinstance(n, ast.Call)}
        assert "main" in called, f"{_rel(path)} does not call a command's main()"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return trail[trail.index(dep):] + [dep]
            if state.get(dep) is None and (found := visit(dep, trail + [dep])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node, [node])):
            return found
    return None


def _module_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps = set()
        for imp in _imports(path):
            target = _pconv_target(imp)
            while target and target not in modules:  # `from pconv.x.y import name`: the module pconv.x.y
                target = target.rpartition(".")[0]
            if target and target != module:
                deps.add(target)
        graph[module] = deps
    return graph


def test_no_cycle_between_modules():
    """A cycle makes import order matter and the two modules one concern in two files: cut them differently."""
    cycle = _cycle(_module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_between_packages():
    """The stages are layered; two packages that import each other are one stage, or a concern in the wrong one."""
    graph: dict[str, set[str]] = {}
    for module, deps in _module_graph().items():
        package = _package_of(module)
        if package:
            graph.setdefault(package, set()).update(
                d for dep in deps if (d := _package_of(dep)) and d != package)
    cycle = _cycle(graph)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_commands_apps_pipelines_or_tests():
    """The library is what a job runs on a cluster and what a registered model ships: it must work without the
    command line, the demo, the scripts or the test suite (test-only code reaches it through documented hooks)."""
    test_modules = {p.stem for p in (REPO / "tests").rglob("*.py")} | {"tests", "conftest"}
    paths = [p for m, p in _modules().items() if _package_of(m) in LIBRARY]

    def rule(path: Path, imp: Import) -> str | None:
        root = imp.target.split(".")[0]
        if root in ("pipelines", "benchmarks") or root in test_modules:
            return f"the library imports {imp.target}"
        package = _package_of(imp.target) if root == "pconv" else None
        if package in EDGES:
            return f"the library imports {imp.target} ({package} is built on the library, never under it)"
        return None

    wrong = _violations(rule, paths)
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------------------------------------ the core
def test_the_core_imports_nothing_else_of_pconv():
    """The paper in code stands alone (see MAY_IMPORT['core']); checked at every depth, lazy imports included."""
    paths = [p for m, p in _modules().items() if _package_of(m) == "core"]

    def rule(path: Path, imp: Import) -> str | None:
        target = _pconv_target(imp)
        if target and target != "pconv" and _package_of(target) != "core":
            return f"the core imports {target}"
        return None

    wrong = _violations(rule, paths)
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_no_ray_mlflow_or_other_pconv_at_import_time():
    """Importing every core module in a fresh interpreter loads neither Ray nor MLflow (seconds of start-up and a
    heavy dependency for a reader of the paper's code) nor any pconv package outside the core."""
    core = sorted(m for m in _modules() if _package_of(m) == "core")
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in core)
            + "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow') "
              "or (m.startswith('pconv.') and not m.startswith('pconv.core')))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not loaded, f"importing {core} loads {loaded}"


def test_the_data_tasks_load_no_torch():
    """What Ray Data's tasks import to run pconv's functions (by reference: the decode task's module
    ``pconv.data.stream``, the ingest task's ``pconv.ingest.job``) loads no torch: a task worker process starts
    ~1.9 CPU-s sooner and a few hundred MB smaller, and Ray may start them anew around every epoch."""
    code = ("import sys\nimport pconv.data.stream, pconv.ingest.job\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]


# ------------------------------------------------------------------------------------------------ how modules meet
def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_aliases(path: Path) -> dict[str, str]:
    """Local name -> the pconv module it is bound to: `import pconv.data.stream as s`, `from pconv.data import
    stream`, `from . import stream`, and `import pconv.core.masks` (which binds `pconv`)."""
    module = _module_name(path) if path.is_relative_to(PCONV) else path.stem
    modules = set(_modules())
    aliases: dict[str, str] = {}
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    aliases[a.asname or "pconv"] = a.name if a.asname else "pconv"
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, path.name == "__init__.py", node.level, node.module) if node.level
                    else node.module or "")
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
    return aliases


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def _private_uses(path: Path) -> list[str]:
    here = _module_name(path) if path.is_relative_to(PCONV) else None
    modules = set(_modules())
    out = []
    for imp in _imports(path):
        target = _pconv_target(imp)
        for name in imp.names:
            if target and target != here and _is_private(name):
                out.append(f"{_rel(path)}:{imp.line}: from {target} import {name}")
        if target in modules and target != here and _is_private(target.rpartition(".")[2]):
            out.append(f"{_rel(path)}:{imp.line}: imports the private module {target}")
    aliases = _module_aliases(path)
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and (base := _dotted(node.value)):
            head, _, rest = base.partition(".")
            if head not in aliases:
                continue
            module = f"{aliases[head]}.{rest}" if rest else aliases[head]
            if module in modules and module != here:
                out.append(f"{_rel(path)}:{node.lineno}: {base}.{node.attr} ({module}'s private name)")
    return out


def test_no_private_name_is_used_across_modules():
    """A module's `_private` names are free to change without notice; a neighbour that calls one is coupled to its
    insides, and the call says the cut between the two is wrong (make the name public, or move the code)."""
    paths = _files() + sorted((REPO / "pipelines").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))
    wrong = [v for path in paths for v in _private_uses(path)]
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------------------------------------ what the library holds
TEST_ENV_WORDS = {"TEST", "TESTS", "TESTING", "FAULT", "FAULTS", "CRASH", "TRACE", "TRACING", "INJECT", "HOOK",
                  "HOOKS"}  # words of an environment variable that switches test code on (PCONV_TEST_HOOKS)
TEST_WORDS = re.compile(r"\bfor (?:fast |the |unit )?tests\b|\btest[- ]only\b|\bonly (?:for|in) tests\b", re.IGNORECASE)
ENV_READS = ("os.environ.get", "os.getenv", "environ.get", "getenv", "os.environ.setdefault", "os.environ.pop")


def _env_names(path: Path) -> list[tuple[int, str]]:
    """Environment variables a module reads: os.environ.get/getenv/[...]/`in os.environ` with a literal name."""
    found = []
    for node in ast.walk(_tree(path)):
        name = None
        if isinstance(node, ast.Call) and _call_name(node.func) in ENV_READS and node.args:
            name = node.args[0]
        elif isinstance(node, ast.Subscript) and _dotted(node.value) in ("os.environ", "environ"):
            name = node.slice
        elif isinstance(node, ast.Compare) and any(_dotted(c) in ("os.environ", "environ") for c in node.comparators):
            name = node.left
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            found.append((node.lineno, name.value))
    return found


def _comments_and_strings(path: Path) -> list[tuple[int, str]]:
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            out.append((tok.start[0], tok.string))
    return out


def test_no_test_hook_in_the_library():
    """Production workers must not run code that exists for tests: no environment switch that turns on crash
    injection or tracing (PCONV_TEST_*), no test-only module or mode. Tests reach the library through documented
    hooks (e.g. the worker loop's step hook) or fixtures, and that code lives in tests/."""
    wrong = []
    for path in _files():
        module = _module_name(path)
        if re.search(r"(^|_)(test|tests|testing|fault|faults|mock|fake|stub)(_|$)", module.rpartition(".")[2]):
            wrong.append(f"{_rel(path)}: a test-only module in the library")
        wrong += [f"{_rel(path)}:{line}: reads the environment variable {name} (a test switch)"
                  for line, name in _env_names(path) if TEST_ENV_WORDS & set(name.upper().split("_"))]
        for line, text in _comments_and_strings(path):
            if "PCONV_TEST" in text:
                wrong.append(f"{_rel(path)}:{line}: names PCONV_TEST")
            if m := TEST_WORDS.search(text):
                wrong.append(f"{_rel(path)}:{line}: code that says it exists '{m.group(0)}'")
    assert not wrong, "\n".join(wrong)


PAIR_SOURCE = re.compile(r"pair|bank", re.IGNORECASE)


def test_no_isinstance_on_the_pair_source():
    """Inpainting and super-resolution pair each crop with its holes through ONE pair-source interface (a mask bank
    or the SR grid); a branch on the source's class (`isinstance(bank, SRPairs)`) is a special case that every new
    consumer must repeat and every new task must find."""
    wrong = []
    for path in _files():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and _call_name(node.func) in ("isinstance", "issubclass") and len(
                    node.args) == 2:
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                for cls in classes:
                    name = (_dotted(cls) or "").rpartition(".")[2]
                    if PAIR_SOURCE.search(name):
                        wrong.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------------------------------------ one owner per name
# name -> the one file that defines it (at module level): a second definition drifts from the first.
ONE_DEFINITION = {
    "default_layer_size": "pconv/core/unet.py",
    "PAPER_IMAGE_SIZE": "pconv/core/unet.py",
    "IMAGE_SUFFIXES": "pconv/core/images.py",
    "MASK_SUFFIXES": "pconv/core/masks.py",
    "HOLE_COLORS": "pconv/core/masks.py",
    "HOLE_RATIO_BINS": "pconv/core/masks.py",
    "MANIFEST": "pconv/storage/shards.py",
    "STATE_FILE": "pconv/tracking/checkpoints.py",
    "META_FILE": "pconv/tracking/checkpoints.py",
    "INPAINTING_MODEL": "pconv/tracking/registry.py",
    "CANDIDATE": "pconv/tracking/registry.py",
    "CHAMPION": "pconv/tracking/registry.py",
    "LOSS_TERMS": "pconv/core/losses.py",
    "center_crop": "pconv/core/images.py",
    "open_image": "pconv/core/images.py",
    "parse_registry_uri": "pconv/tracking/loading.py",
    "load_model": "pconv/tracking/loading.py",
    "register_checkpoint": "pconv/tracking/registry.py",
}


def _definitions(name: str) -> list[str]:
    out = []
    for path in _files() + sorted((REPO / "pipelines").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py")):
        for node in _tree(path).body:
            targets: list[str] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                targets = [node.name]
            elif isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                targets = [node.target.id]
            if name in targets:
                out.append(_rel(path))
    return out


@pytest.mark.parametrize("name", sorted(ONE_DEFINITION))
def test_each_shared_name_has_one_owner(name):
    """Each shared name or constant has one definition, so a change is made once (paper constants cite their
    source there)."""
    assert _definitions(name) == [ONE_DEFINITION[name]]


# literal -> the one library file where it may appear as a string (everyone else uses the constant)
ONE_LITERAL = {
    "pconv-unet": "pconv/tracking/registry.py",
    "pconv-sr": "pconv/tracking/registry.py",
    "candidate": "pconv/tracking/registry.py",
    "champion": "pconv/tracking/registry.py",
    "manifest.json": "pconv/storage/shards.py",
    "state.pt": "pconv/tracking/checkpoints.py",
    "meta.json": "pconv/tracking/checkpoints.py",
}


@pytest.mark.parametrize("literal", sorted(ONE_LITERAL))
def test_names_are_string_literals_in_one_place_only(literal):
    """A registered-model name, alias or file name spelled as a string in two places is two names that happen to
    agree today; the other modules use the owner's constant."""
    holders = []
    for path in _files() + sorted((REPO / "pipelines").glob("*.py")):
        tree = _tree(path)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == literal and id(node) not in docstrings:
                holders.append(f"{_rel(path)}:{node.lineno}")
    assert {h.split(":")[0] for h in holders} <= {ONE_LITERAL[literal]}, holders


def test_commands_share_one_error_exit():
    """No command hand-writes the try/except/print/`return 2` block: pconv.commands.common owns the one error exit,
    so every command reports a refusal the same way (README: Bad input)."""
    for path in sorted((PCONV / "commands").glob("*.py")) + sorted((REPO / "pipelines").glob("*.py")):
        if path.name != "common.py":
            assert not re.search(r"return 2\b", path.read_text()), (
                f"{_rel(path)} returns 2 itself; use pconv.commands.common")


# ------------------------------------------------------------------------------------------------ one map
def _names(text: str) -> frozenset[str]:
    """The packages a map entry names: '``core``, ``storage``', 'core, storage', '—' / 'nothing ...' (none),
    'any library package [and ``apps``]' (the library [+ apps])."""
    text = " ".join(text.split())
    if text in ("", "—", "-") or text.startswith(("nothing", "(nothing")):
        return frozenset()
    base = frozenset(LIBRARY) if "any library package" in text else frozenset()
    words = re.findall(r"[A-Za-z_]\w*", text.replace("any library package", ""))
    return base | frozenset(w for w in words if w in PACKAGES)


def _docstring(path: Path) -> str:
    return ast.get_docstring(_tree(path)) or ""


def _readme_architecture() -> str:
    text = (REPO / "README.md").read_text()
    assert "\n## Architecture" in text, "README has no '## Architecture' section"
    return text.split("\n## Architecture", 1)[1].split("\n## ", 1)[0]


def _table(text: str) -> dict[str, str]:
    """A markdown table's rows keyed by the package in the first cell (`core/`, `cluster.py`, `pipelines/*.py`)
    -> the last cell (what it may import)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (m := re.fullmatch(r"`(?:pconv/)?(\w+)(?:/|\.py|/\*\.py)?`", cells[0])):
            rows[m.group(1)] = cells[-1]
    return rows


PIPELINES_ROW = frozenset({"commands"})  # pipelines/*.py import only pconv.commands


def test_the_map_is_the_same_everywhere():
    """One map, said the same way wherever a reader meets it: each package's docstring ("May import: ..."),
    pconv/__init__.py's list of stages ("<- ..."), README's Architecture table, and MAY_IMPORT here; README points
    to ARCHITECTURE.md's table."""
    wrong = []
    for package in PACKAGES:
        if package in ("cluster", "commands"):  # cluster.py is a module; commands' docstring is `pconv --help`'s
            continue                              # description. pconv/__init__.py's list names both.
        path = PCONV / package / "__init__.py"
        m = re.search(r"May import:(.+?)(?:\n\n|\Z)", _docstring(path), re.DOTALL)
        if not m:
            wrong.append(f"{_rel(path)}: the docstring has no 'May import:' line")
        elif (said := _names(m.group(1))) != MAY_IMPORT[package]:
            wrong.append(f"{_rel(path)}: 'May import: {' '.join(m.group(1).split())}' is {sorted(said)}, the map "
                         f"says {sorted(MAY_IMPORT[package])}")
    listed = dict(re.findall(r"^\s+(\w+)(?:/|\.py)\s.*<-(.*)$", _docstring(PCONV / "__init__.py"), re.MULTILINE))
    if set(listed) != set(PACKAGES):
        wrong.append(f"pconv/__init__.py lists the stages {sorted(listed)}, the map has {sorted(PACKAGES)}")
    wrong += [f"pconv/__init__.py: {p} <- {sorted(_names(t))}, the map says {sorted(MAY_IMPORT[p])}"
              for p, t in listed.items() if p in MAY_IMPORT and _names(t) != MAY_IMPORT[p]]
    section = _readme_architecture()
    readme = _table(section)
    if set(readme) != set(PACKAGES) | {"pipelines"}:
        wrong.append(f"README's Architecture table lists {sorted(readme)}, the map has "
                     f"{sorted(set(PACKAGES) | {'pipelines'})}")
    for package, cell in readme.items():
        expected = MAY_IMPORT.get(package, PIPELINES_ROW)
        if _names(cell) != expected:
            wrong.append(f"README's Architecture table: {package} may import {cell!r}, the map says "
                         f"{sorted(expected)}")
    if "ARCHITECTURE.md" not in section:
        wrong.append("README's Architecture section does not point to ARCHITECTURE.md")
    assert not wrong, "\n".join(wrong)


# the deliberate differences from ../shared/ARCHITECTURE.md's table (their reasons: MAY_IMPORT's comments)
ARCHITECTURE_DEVIATIONS = {"commands": frozenset({"apps"})}


def test_architecture_md_says_the_same():
    """../shared/ARCHITECTURE.md (the agreed shape, beside the repository) and this map differ only where MAY_IMPORT
    says why."""
    if not ARCHITECTURE_MD.is_file():
        pytest.skip(f"{ARCHITECTURE_MD} is not beside the repository")
    table = _table(ARCHITECTURE_MD.read_text())
    wrong = [f"ARCHITECTURE.md: {package} may import {table.get(package)!r}, the map says "
             f"{sorted(MAY_IMPORT[package] - ARCHITECTURE_DEVIATIONS.get(package, frozenset()))}"
             for package in PACKAGES
             if _names(table.get(package, "?")) != MAY_IMPORT[package] - ARCHITECTURE_DEVIATIONS.get(package,
                                                                                                     frozenset())]
    if _names(table.get("pipelines", "")) != PIPELINES_ROW:
        wrong.append(f"ARCHITECTURE.md: pipelines may import {table.get('pipelines')!r}")
    assert not wrong, "\n".join(wrong)
