"""The module map of ../shared/ARCHITECTURE.md, checked on the source: who may import whom, no cycle, the core free
of Ray and MLflow at import time, module sizes, and one definition per shared name or constant.

Imports are read with ``ast`` (top-level AND function-level ``from pconv... import``), so a lazy import cannot hide
a back-flow. Each failure names the module, the import and the rule.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PCONV = REPO / "pconv"

# ARCHITECTURE.md's table ("may import"), plus the extras agreed in the re-cut (issue 13), each with its reason:
#  - images (decode, suffixes, the one centre crop) and storage (URIs, atomic writes) are leaf utilities any
#    module may use;
#  - sources (folder / zip / s3 prefix file sets) serves ingest, inference and evaluation;
#  - metrics reads the paper's hole-ratio bins from masks; registry validates configs (config);
#  - train's worker loop lives in train_loop (one concern: the loop you read in one screen), and both compute
#    validation metrics (metrics); the driver checks the input manifests before the cluster is touched (shards);
#  - allocator (glibc buffer reuse) and model_inputs (uint8 rows -> float model inputs) were split out of data;
#  - mlflow_runs (tracking URI, client, retries, run lookup) was split out of tracking;
#  - pyfunc_model is the MLflow pyfunc flavour's loader module (shipped inside the model with code_paths): the
#    byte-level request contract shared by the pyfunc and the Serve app.
UTILITIES = {"images", "storage"}
ALLOWED: dict[str, set[str]] = {
    "layers": set(),
    "model": {"layers"},
    "losses": set(),
    "masks": set(),
    "sr_grid": set(),  # issue 18: the paper's SR grid (Sec. 5); masks is at its size limit, and this is its own concern
    "metrics": {"masks"},
    "config": {"model", "sr_grid"},  # issue 18: `sr_scale` is validated by the grid's own check_scale
    "images": set(),
    "storage": set(),
    "sources": set(),
    "shards": {"masks"},
    "ingest_rows": {"shards", "masks"},  # issue 17: one file -> one shard row, shared by both ingest engines
    "ingest": {"shards", "masks", "sources", "ingest_rows"},
    # issue 17: ingest as a Ray Data job across the cluster; reuses ingest's checks and run end, ingest_rows' rows
    "ingest_job": {"ingest", "ingest_rows", "shards", "masks", "sources", "cluster"},  # cluster: chunks for reachable CPUs
    "transforms": {"masks", "shards", "sr_grid"},  # issue 18: SR pairs (LR crop + grid) built on the fly
    "allocator": set(),
    "model_inputs": {"sr_grid"},  # issue 18: SR's net input is the LR canvas on the grid (place_on_grid)
    # issue 14: the cluster as its autoscaler can make it (nodes now + launchable node types); resource planning
    # (train's concern) lives there so that data (decode pool bound), batch (actor pool) and serve (GPU replicas)
    # plan on the same view instead of each reading a submit-time ray.cluster_resources() snapshot
    "cluster": set(),
    "data": {"transforms", "shards", "masks", "allocator", "model_inputs", "cluster"},
    "train_stream": {"data", "transforms"},  # issue 15: per-worker epoch plan + data position (exact resume)
    "train_checkpoint": {"checkpoint", "train_stream"},  # issue 15: the data position a checkpoint records
    "fault_hooks": set(),  # issue 15: test-only worker crash + sample-id trace (off unless PCONV_TEST_HOOKS)
    "checkpoint": set(),
    "mlflow_runs": set(),
    "tracking": {"config", "mlflow_runs"},
    "registry": {"checkpoint", "tracking", "model", "config"},
    # issue 19: tracking (the store a models:/ URI used, redacted); issue 18: config, the `task` names' one owner
    "loading": {"registry", "checkpoint", "model", "tracking", "config"},
    "train_loop": {"model", "losses", "data", "checkpoint", "tracking", "registry", "loading", "config", "metrics",
                   "allocator", "model_inputs", "train_stream",
                   "train_checkpoint", "fault_hooks"},
    "train": {"model", "losses", "data", "checkpoint", "tracking", "registry", "loading", "config", "metrics",
              "train_loop", "shards", "cluster"},
    "inference": {"loading", "model", "masks", "sources"},
    "baseline": set(),
    # issue 15: the evaluation's inputs (images streamed in batches, masks, fixed pairs) split out of evaluation,
    # which was at its size limit; no model, no Ray, no MLflow
    "eval_data": {"shards", "masks", "sources"},
    "evaluation": {"inference", "baseline", "metrics", "shards", "registry", "tracking", "masks", "sources",
                   "loading", "eval_data"},
    "batch": {"inference", "loading", "masks", "cluster"},
    "super_resolution": {"inference", "loading", "sr_grid"},  # issue 18: SR use (LR -> HR composite), any size
    "sr_evaluation": {"super_resolution", "evaluation", "eval_data", "metrics", "loading", "tracking", "images"},  # issue 18
    "pyfunc_model": {"inference", "loading", "masks", "super_resolution"},  # issue 18: SR models answer too
    "serve": {"inference", "loading", "registry", "masks", "pyfunc_model", "super_resolution", "cluster"},
    "cli": {"masks"},
}
CORE = ("layers", "model", "losses", "masks", "metrics", "config", "images", "sr_grid")
NEVER_FROM_TRAIN = {"inference", "serve", "evaluation", "batch"}
MAX_MODULE_LINES = 400
MAX_PIPELINE_LINES = 100


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PCONV.glob("*.py")) if p.stem != "__init__"}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module top level) for every import of a third-party or pconv module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "pconv" else [])
        for name in names:
            found.append((name, node.lineno, id(node) in top))
    return found


def _pconv_deps(path: Path) -> dict[str, int]:
    deps: dict[str, int] = {}
    for name, line, _ in _imports(path):
        parts = name.split(".")
        if parts[0] == "pconv" and len(parts) > 1:
            deps.setdefault(parts[1], line)
    return deps


def test_every_module_is_on_the_map():
    missing = sorted(set(_modules()) - set(ALLOWED))
    assert not missing, f"pconv modules not on the map (add them to ARCHITECTURE.md and ALLOWED): {missing}"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_follow_the_map(module):
    path = PCONV / f"{module}.py"
    if not path.exists():
        pytest.skip(f"pconv/{module}.py does not exist (yet)")
    allowed = ALLOWED[module] | UTILITIES | {module}
    wrong = {dep: line for dep, line in _pconv_deps(path).items() if dep not in allowed}
    assert not wrong, (f"pconv/{module}.py imports {', '.join(f'{d} (line {n})' for d, n in sorted(wrong.items()))}"
                       f"; the map allows {sorted(ALLOWED[module] | UTILITIES)}")


def test_no_import_cycle():
    graph = {m: set(_pconv_deps(p)) - {m} for m, p in _modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep in graph and state.get(dep) is None:
                visit(dep, trail + [dep])
        state[node] = 2

    for module in sorted(graph):
        if state.get(module) is None:
            visit(module, [module])


def test_library_never_imports_apps_pipelines_or_tests():
    for module, path in _modules().items():
        for name, line, _ in _imports(path):
            root = name.split(".")[:2]
            assert root[0] not in ("pipelines", "tests", "conftest"), f"pconv/{module}.py:{line} imports {name}"
            assert root != ["pconv", "apps"], f"pconv/{module}.py:{line} imports the apps package ({name})"


@pytest.mark.parametrize("module", CORE)
def test_core_never_imports_ray_or_mlflow_at_import_time(module):
    top = [(n, line) for n, line, at_top in _imports(PCONV / f"{module}.py") if at_top]
    bad = [(n, line) for n, line in top if n.split(".")[0] in ("ray", "mlflow")]
    assert not bad, f"pconv/{module}.py imports {bad} at module level"


def test_train_does_not_depend_on_the_serving_side():
    for module in ("train", "train_loop"):
        path = PCONV / f"{module}.py"
        if path.exists():
            bad = set(_pconv_deps(path)) & NEVER_FROM_TRAIN
            assert not bad, f"pconv/{module}.py imports {sorted(bad)}"


def test_module_and_pipeline_sizes():
    big = {p.relative_to(REPO).as_posix(): n for p in PCONV.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"library modules over {MAX_MODULE_LINES} lines (split them by concern): {big}"
    long = {p.name: n for p in (REPO / "pipelines").glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_PIPELINE_LINES}
    assert not long, f"pipelines over {MAX_PIPELINE_LINES} lines (move logic into the library): {long}"


# name -> the one file allowed to define it (assignment or def at module level)
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
    for path in list(PCONV.rglob("*.py")) + list((REPO / "pipelines").glob("*.py")) + list(
            (REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            targets: list[str] = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                targets = [node.name]
            elif isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                targets = [node.target.id]
            if name in targets:
                out.append(path.relative_to(REPO).as_posix())
    return out


@pytest.mark.parametrize("name", sorted(ONE_DEFINITION))
def test_each_shared_name_has_one_owner(name):
    assert _definitions(name) == [ONE_DEFINITION[name]]


# literal -> the one library file where it may appear as a string (pipelines and tests use the constants too)
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
    holders = []
    for path in list(PCONV.rglob("*.py")) + list((REPO / "pipelines").glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value == literal and id(node) not in docstrings):
                holders.append(f"{path.relative_to(REPO).as_posix()}:{node.lineno}")
    assert {h.split(":")[0] for h in holders} <= {ONE_LITERAL[literal]}, holders


def test_pipelines_share_one_error_exit():
    """No pipeline hand-writes the try/except/print/`return 2` block: pconv.commands.common.run owns it."""
    for path in (REPO / "pipelines").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"return 2\b", text), f"{path.name} returns 2 itself; use pconv.commands.common.run"
