"""The command-line entry points: one module per command, each ``build_parser()`` + ``main(argv) -> exit status``.

Run a module as a script (``python pipelines/train.py ...``, what ``ray job submit --working-dir .`` ships) or
through the installed ``pconv`` command (``pconv train ...``, :mod:`pipelines.__main__`): the same parser either way.
The library (``pconv``) never imports this package.
"""
