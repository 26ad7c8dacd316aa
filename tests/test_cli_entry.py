"""The installed ``pconv`` command (pyproject's ``[project.scripts]``): one command whose subcommands are the
modules of ``pconv.commands`` (``main(argv)`` each), the same as the ``pipelines/*.py`` scripts, run as a user runs
them (subprocesses), and a non-editable build that ships only ``pconv`` (wheel contents, then the wheel installed
outside the source tree and run from there)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _command_table():
    """pconv/commands/__init__.py, read from the source tree (standard library only, so no install needed)."""
    spec = importlib.util.spec_from_file_location("pconv_command", REPO / "pconv" / "commands" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS = _command_table().COMMANDS
SCRIPT_OF = {module: script for script, module in _command_table().SCRIPT_NAMES.items()}  # ingest: prepare_data

PCONV = Path(sys.executable).parent / "pconv"
ENV = {**os.environ, "COLUMNS": "100"}  # argparse wraps help at $COLUMNS: the same width in both runs


def run(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 120):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd or REPO, env=env or ENV, timeout=timeout)


def test_the_entry_point_is_installed_in_the_venv():
    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == "pconv"]
    assert [ep.value for ep in eps] == ["pconv.commands:main"], \
        "the pconv entry point is not installed: run `make setup` (or `pip install -e .`) after changing pyproject.toml"
    assert PCONV.is_file() and os.access(PCONV, os.X_OK), PCONV


def test_top_level_help_lists_every_command_on_one_line():
    proc = run([str(PCONV), "--help"], env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, (_, help_line) in COMMANDS.items():
        assert any(line.split() == [name, *help_line.split()] for line in lines), (name, proc.stdout)
    assert len(COMMANDS) == len({module for module, _ in COMMANDS.values()})
    assert {SCRIPT_OF.get(module, module) for module, _ in COMMANDS.values()} == {
        p.stem for p in (REPO / "pipelines").glob("*.py")}, "a script has no command, or a command no script"
    assert {module for module, _ in COMMANDS.values()} == {
        p.stem for p in (REPO / "pconv" / "commands").glob("*.py") if p.stem not in {"__init__", "common"}}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help_is_its_scripts_help(command):
    """`pconv CMD --help` prints the script's own parser (only the program name differs)."""
    script = SCRIPT_OF.get(COMMANDS[command][0], COMMANDS[command][0])
    via_pconv = run([str(PCONV), command, "--help"])
    via_script = run([sys.executable, f"pipelines/{script}.py", "--help"])
    assert via_pconv.returncode == 0 == via_script.returncode, via_pconv.stderr + via_script.stderr
    assert via_pconv.stdout.startswith(f"usage: pconv {command} ")
    def words(text: str, prog: str) -> list[str]:  # usage lines are indented by the program name's length
        return re.sub(rf"(?<![\w/]){re.escape(prog)}\b", "PROG", text).split()

    assert words(via_pconv.stdout, f"pconv {command}") == words(via_script.stdout, f"{script}.py")


@pytest.mark.parametrize("argv, message", [
    (["trian"], "unknown command 'trian' (did you mean 'train'?)"),
    (["prepare_data", "images"], "unknown command 'prepare_data' (did you mean 'ingest'?)"),
    (["frobnicate"], "unknown command 'frobnicate'; choose from ingest, train,"),
    ([], "a COMMAND is required"),
])
def test_unknown_or_missing_command_is_a_usage_error(argv, message):
    proc = run([str(PCONV), *argv])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: pconv ") and f"pconv: error: {message}" in proc.stderr, proc.stderr


def test_a_commands_exit_status_and_error_line_come_through():
    """A refused input exits 2 with the script's one-line error, not a traceback."""
    proc = run([str(PCONV), "inpaint", "--model", "/nonexistent/ckpt", "--image", "a.png", "--mask", "m.png",
                "--out", "o.png", "--hole-color", "white"])
    assert proc.returncode == 2, proc.stderr
    assert "error: model /nonexistent/ckpt: no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_non_editable_install_ships_the_command(tmp_path):
    """`pip wheel .` of the sources the node image copies (Dockerfile): the wheel holds pconv only (its stage packages,
    pconv.commands, pconv.apps and the Serve page); installed outside the source tree, `pconv` runs from there."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for folder in ("pconv", "pipelines"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                 "-w", str(tmp_path / "dist")], cwd=src)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("pconv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "pconv").rglob("*.py")} | {
        "pconv/inference/serve_page.html", "pconv/py.typed"}
    assert expected <= names, sorted(expected - names)
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"pconv"}, sorted(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the Apache-2.0 text ships in the wheel"
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pconv = pconv.commands:main" in zipfile.ZipFile(wheel).read(entry).decode()

    site = tmp_path / "site"
    install = run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                   str(wheel)])
    assert install.returncode == 0, install.stderr
    env = {**ENV, "PYTHONPATH": str(site)}  # before the venv's editable finder: the installed copy wins
    where = run([sys.executable, "-c", "import pconv.commands as c, pconv.inference.serve as s; print(c.__file__, "
                 "s.PAGE_FILE.is_file())"], cwd=tmp_path, env=env)
    assert where.stdout.split() == [str(site / "pconv" / "commands" / "__init__.py"), "True"], where.stdout + where.stderr
    proc = run([str(site / "bin" / "pconv"), "serve", "--help"], cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pconv serve "), proc.stderr
