"""`python -m circuitlab.cli ...`: the same as the `circuitlab` command."""
import sys

from . import main

sys.exit(main())
