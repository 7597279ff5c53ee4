"""`python -m prefalign <command> ...` (what `torchrun -m prefalign` and `accelerate launch -m prefalign`
start)."""

import sys

from prefalign.cli import main

sys.exit(main())
