"""What every command shows a person: `--help` with choices and defaults for each option, and progress bars on long
work (folder inpaint, evaluate) on stderr when it is a terminal, none when it is not (logs and pipes stay clean)."""

from __future__ import annotations

import argparse
import fcntl
import importlib
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pconv.commands import COMMANDS
from test_loading import save_checkpoint, tiny_model

REPO = Path(__file__).resolve().parents[1]


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command, parser) of every command, sub-parsers included (ingest images|masks|cleanup)."""
    out = []
    for name, (module, _) in COMMANDS.items():
        parser = importlib.import_module(f"pconv.commands.{module}").build_parser()
        out.append((name, parser))
        for action in parser._actions:  # argparse keeps sub-parsers here only
            if isinstance(action, argparse._SubParsersAction):
                out += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return out


@pytest.mark.parametrize("command, parser", parsers(), ids=[c for c, _ in parsers()])
def test_every_option_has_help_and_says_its_default(command, parser):
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest in ("help", "version"):
            continue
        flag = action.option_strings[-1]
        assert action.help, f"pconv {command} {flag}: no help text"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
            continue  # a switch: its help says what it does
        if action.default not in (None, argparse.SUPPRESS, "") and not action.required:
            shown = parser._get_formatter()._expand_help(action)  # the text --help prints for this option
            assert "default" in shown.lower(), f"pconv {command} {flag}: the default {action.default!r} is not shown"


def test_options_with_a_fixed_set_of_values_offer_them():
    """Options whose values are a fixed set show them in --help (`{a,b}`), not a bare metavar."""
    expected = {("train", "--task"), ("train", "--amp"), ("train", "--conv"), ("train", "--sr-scale"),
                ("inpaint", "--hole-color"), ("inpaint", "--device"), ("export", "--format"),
                ("evaluate", "--hole-color")}
    have = {(command, action.option_strings[-1]) for command, parser in parsers() for action in parser._actions
            if action.option_strings and action.choices}
    assert expected <= have, sorted(expected - have)


def run_in_terminal(args: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal (as a person at a shell); its exit code and output."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a size (40×120)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=child, stderr=child, cwd=REPO,
                            env={**os.environ, "COLUMNS": "120"})
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.5)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(main)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def folder_job(tmp_path_factory):
    """A checkpoint and three image/mask pairs (white = hole) in folders."""
    root = tmp_path_factory.mktemp("bars")
    model = save_checkpoint(root / "ckpt", tiny_model(seed=2), step=1)
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / folder).mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "images" / f"p{i}.png")
        hole = np.zeros((40, 56), np.uint8)
        hole[10:25, 8:30] = 255
        Image.fromarray(hole).save(root / "masks" / f"p{i}.png")
    return root, model


def test_folder_inpaint_shows_a_progress_bar_on_a_terminal_and_none_in_a_pipe(folder_job):
    root, model = folder_job
    args = [sys.executable, "pipelines/inpaint.py", "--model", str(model), "--image", str(root / "images"),
            "--mask", str(root / "masks"), "--device", "cpu"]
    code, shown = run_in_terminal(args + ["--out", str(root / "out-tty")])
    assert code == 0, shown
    assert "inpaint: 100%" in shown and "3/3" in shown, shown
    piped = subprocess.run(args + ["--out", str(root / "out-pipe")], capture_output=True, text=True, cwd=REPO,
                           timeout=240)
    assert piped.returncode == 0, piped.stderr
    assert "%|" not in piped.stderr and "3/3" not in piped.stderr, piped.stderr
    assert len(list((root / "out-pipe").glob("*.png"))) == 3


def test_super_resolve_shows_its_tiles_on_a_terminal_and_nothing_in_a_pipe(tmp_path):
    from test_sr_use import save_checkpoint as save_sr_checkpoint

    model = save_sr_checkpoint(tmp_path / "sr", scale=2)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "lr.png")
    args = [sys.executable, "pipelines/super_resolve.py", "--model", str(model), "--image", str(tmp_path / "lr.png"),
            "--device", "cpu", "--max-side", "32"]  # an 80×120 canvas in 32-px tiles
    code, shown = run_in_terminal(args + ["--out", str(tmp_path / "tty.png")])
    assert code == 0, shown
    assert "tiles: " in shown and "tile/s" in shown, shown
    piped = subprocess.run(args + ["--out", str(tmp_path / "pipe.png")], capture_output=True, text=True, cwd=REPO,
                           timeout=240)
    assert piped.returncode == 0, piped.stderr
    assert "tiles: " not in piped.stderr and Image.open(tmp_path / "pipe.png").size == (120, 80)
