"""`python -m circuitlab ...` (and `torchrun ... -m circuitlab ...`): the `circuitlab` command."""
import sys

from .cli import main

sys.exit(main())
