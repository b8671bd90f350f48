"""`python -m pipeline ...` is `caption ...`."""

import sys

from .cli import main

sys.exit(main())
