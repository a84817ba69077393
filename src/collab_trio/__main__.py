"""`python -m collab_trio` is the same as the `collab-trio` command."""

import sys

from .cli import main

sys.exit(main())
