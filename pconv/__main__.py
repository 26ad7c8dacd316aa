"""`python -m pconv COMMAND ...` = the installed `pconv` command (pconv.commands)."""
import sys

from pconv.commands import main

sys.exit(main())
