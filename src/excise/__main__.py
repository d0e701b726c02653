"""``python -m excise`` (and ``torchrun ... -m excise unlearn ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
