"""What every ``pipelines/*.py`` entry point shares: ``--log-level``, one logging format, the ``--hole-color``
option, and one way to turn an expected failure into one clear line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from pconv.core.masks import HOLE_COLORS, WHITE

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
USAGE_ERROR = 2  # exit status of a refused input (argparse uses the same for bad flags)
# What a pipeline reports as one line instead of a traceback: bad input, missing files, failed preconditions.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's ``--help``: the description as written (examples keep their lines), and each option's default
    shown (``(default: X)``) unless its help already states it; switches and options without a default add nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and not action.required and "default" not in text.lower()
                and action.default not in (None, False, True, "", argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` (default INFO)."""
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda`` (default auto: cuda if available, resolved by
    pconv.tracking.loading.resolve_device)."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the net runs (default: auto = cuda if available, else cpu)")


def add_hole_color(parser: argparse.ArgumentParser, flag: str = "--hole-color") -> None:
    """``--hole-color white|black``: which colour marks HOLES in mask files; white by default at every edge (CLI,
    HTTP, pyfunc, Python API), as NVIDIA's test masks, diffusers and LaMa have it. Masks in memory are always
    1 = valid (pconv.core.masks)."""
    parser.add_argument(flag, default=WHITE, choices=HOLE_COLORS,
                        help="which colour marks HOLES in the mask files (default: white, as NVIDIA's test masks, "
                             "diffusers and LaMa; black for masks drawn the other way round)")


def setup_logging(level: str | int) -> None:
    """Root logging at ``level`` (a name such as "info", or a ``logging`` constant) in the pipelines' format."""
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=LOG_FORMAT)


def run(body: Callable[[], int | None], prog: str = "error",
        expected: tuple[type[BaseException], ...] = EXPECTED_ERRORS) -> int:
    """Call ``body``; an ``expected`` exception becomes ``<prog>: <message>`` on stderr and exit status 2."""
    try:
        return int(body() or 0)
    except expected as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return USAGE_ERROR
