"""The fast tier's guard: a fast-tier test starts no Ray, no MLflow server and no S3 server.

``tests/conftest.py`` puts every test that requests none of the server fixtures in the fast tier (``make
test-fast``) and runs it with this guard on, in two places:

- in the pytest process: conftest loads this file and calls :func:`install` with a switch it turns on for the
  duration of each fast-tier test (setup, call and teardown);
- in every Python process such a test starts: conftest puts this folder first on ``PYTHONPATH`` while the test
  runs, and Python imports ``sitecustomize`` at start-up, so the children (and theirs) are guarded too.

A guarded process refuses, with an error that names the test (``PYTEST_CURRENT_TEST``, which pytest sets and
child processes inherit):

- to create a Ray node: ``ray.init()`` (starting a local Ray or joining a cluster) and ``ray start`` both go
  through ``ray._private.node.Node``;
- to spawn ``ray start``, ``mlflow server`` / ``mlflow ui`` / ``mlflow models serve`` or moto's S3 server;
- to be one of those processes itself (a child started from a shell script).

The remedy is never to loosen this: a test that needs one of them requests the fixture (see conftest), which puts
it in the server tier (``make test``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable

FIXTURES = "ray_local, own_ray_cluster, s3_server, s3_bucket, mlflow_server or own_servers"
EXIT_STATUS = 97  # a guarded child that is itself a server exits with this


class FastTierViolation(RuntimeError):
    """A fast-tier test started (or tried to start) Ray, an MLflow server or an S3 server."""


_active: Callable[[], bool] = lambda: True
_installed = False


def message(what: str) -> str:
    test = os.environ.get("PYTEST_CURRENT_TEST", "a fast-tier test").rsplit(" (", 1)[0]
    return (f"{test} starts {what}, but it is in the fast tier (make test-fast), which starts no Ray, no MLflow "
            f"server and no S3 server. A test that needs one requests the fixture ({FIXTURES}; tests/conftest.py), "
            "which puts it in the server tier (make test).")


def server_command(argv: list[str] | tuple[str, ...] | str | bytes) -> str | None:
    """What server ``argv`` starts ('ray start', 'mlflow server', "moto's S3 server"), or None."""
    if isinstance(argv, (str, bytes)):
        argv = shlex.split(os.fsdecode(argv))
    words = [os.path.basename(os.fsdecode(a)) for a in argv]
    for i, word in enumerate(words):
        rest = words[i + 1:]
        if word == "moto_server" or (word == "-m" and rest[:1] == ["moto.server"]):
            return "moto's S3 server"
        if word == "mlflow" or (word == "-m" and rest[:1] == ["mlflow"]):
            rest = rest[1:] if word == "-m" else rest
            if rest[:1] in (["server"], ["ui"]) or rest[:2] == ["models", "serve"]:
                return "an MLflow server (mlflow " + " ".join(rest[:2] if rest[0] == "models" else rest[:1]) + ")"
        if word == "ray" and rest[:1] == ["start"]:
            return "a Ray cluster (ray start)"
    return None


def _guard_popen() -> None:
    original = subprocess.Popen.__init__

    def __init__(self, args, *a, **kw):
        what = server_command(args) if _active() else None
        if what:
            raise FastTierViolation(message(what))
        original(self, args, *a, **kw)

    subprocess.Popen.__init__ = __init__


def _patch_node(module) -> None:
    original = module.Node.__init__

    def __init__(self, *a, **kw):
        if _active():
            raise FastTierViolation(message("Ray (ray.init / ray start: a Ray node)"))
        original(self, *a, **kw)

    module.Node.__init__ = __init__


def _guard_ray() -> None:
    """Patch ``ray._private.node.Node`` now if Ray is imported, else as soon as it is."""
    if "ray._private.node" in sys.modules:
        _patch_node(sys.modules["ray._private.node"])
        return
    import importlib.abc
    import importlib.machinery

    class _RayNodeFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "ray._private.node":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _patch_node(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _RayNodeFinder())


def install(active: Callable[[], bool]) -> None:
    """Guard this process while ``active()`` is true (the pytest process: during fast-tier tests)."""
    global _active, _installed
    _active = active
    if not _installed:
        _installed = True
        _guard_popen()
        _guard_ray()


if __name__ == "sitecustomize":  # a child process of a fast-tier test: always guarded
    _what = server_command(sys.orig_argv)
    if _what:
        sys.stderr.write(f"FastTierViolation: {message(_what)}\n")
        sys.stderr.flush()
        os._exit(EXIT_STATUS)
    install(lambda: True)
