"""`python -m submoe ...`, the same as the `submoe` command."""
import sys

from .cli import main

sys.exit(main())
