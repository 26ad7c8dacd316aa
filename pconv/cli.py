"""What every ``pipelines/*.py`` entry point shares: the ``--log-level`` flag and one logging format."""

from __future__ import annotations

import argparse
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` (default INFO)."""
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def setup_logging(level: str | int) -> None:
    """Root logging at ``level`` (a name such as "info", or a ``logging`` constant) in the pipelines' format."""
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=LOG_FORMAT)
