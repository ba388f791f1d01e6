"""`python -m nanoseek` (also how torchrun starts it): the same CLI as the `nanoseek` script."""

import sys

from .cli import main

sys.exit(main())
