"""``python -m classreg.elastix``: the same as the ``classreg-elastix`` command (through the start-up server of
:mod:`classreg.elastix.server` when it is on)."""
import sys

from .server import run

sys.exit(run("elastix"))
