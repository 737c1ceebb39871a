"""``python -m classreg.elastix``: the same as the ``classreg-elastix`` command."""
import sys

from .registration import main

sys.exit(main())
