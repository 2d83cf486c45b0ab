"""``python -m gptlib``: the command line, as torchrun starts it (``torchrun ... -m gptlib pretrain ...``)."""

import sys

from .cli import main

sys.exit(main())
