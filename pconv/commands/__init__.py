"""pconv: the project's command line (installed by pip; `python -m pconv` is the same).

Each command is one module of this package with ``build_parser()`` and ``main(argv) -> exit status``;
``pipelines/X.py`` are the same commands as scripts, for ``ray job submit -- python pipelines/train.py ...``.
`pconv COMMAND --help` is that command's help. Nothing in the library imports this package.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

# command -> (its module in this package, its line in `pconv --help`: <= 60 characters)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("ingest", "images or masks -> Parquet shards + manifest.json"),
    "train": ("train", "train on a Ray cluster: 2 phases, checkpoints, MLflow"),
    "register": ("register", "register a checkpoint in the MLflow registry + alias"),
    "evaluate": ("evaluate", "paper's per-bin evaluation vs a baseline; promotion"),
    "inpaint": ("inpaint", "inpaint image files or folders with a trained model"),
    "batch-inpaint": ("batch_inpaint", "offline inpainting at scale with Ray Data"),
    "super-resolve": ("super_resolve", "super-resolve an image (a model trained with task: sr)"),
    "serve": ("serve", "HTTP API + web page with Ray Serve"),
    "export": ("export", "export a model as ONNX or TorchScript for other runtimes"),
    "demo": ("demo", "the whole pipeline on sample photos (a source checkout)"),
}

SCRIPT_NAMES = {"prepare_data": "ingest"}  # pipelines/ scripts named otherwise than their command


class _OneLineHelp(argparse.RawDescriptionHelpFormatter):
    """Help text in column 20, so that each command (the longest is 13 characters) fits its line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=20)
        self._action_max_length = 18  # argparse sizes the column without the commands' extra indent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pconv", description=__doc__, formatter_class=_OneLineHelp)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (_, help_line) in COMMANDS.items():
        sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv)  # --help / --version exit here
        parser.error("a COMMAND is required (pconv --help lists them)")
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}{_suggestion(command)}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(f"pconv.commands.{COMMANDS[command][0]}")
    saved, sys.argv = sys.argv, [f"pconv {command}", *rest]  # argparse's prog: "pconv train", not "pconv"
    try:
        return int(module.main(rest) or 0)
    finally:
        sys.argv = saved


def _suggestion(command: str) -> str:
    by_module = {module: name for name, (module, _) in COMMANDS.items()} | SCRIPT_NAMES
    stem = command.removesuffix(".py").replace("-", "_")
    if stem in by_module:  # the script's name: `pconv prepare_data` -> ingest
        return f" (did you mean {by_module[stem]!r}?)"
    close = difflib.get_close_matches(command, COMMANDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pconv")
    except PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
