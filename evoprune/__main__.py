"""`python -m evoprune ...` (and `torchrun ... -m evoprune prune ...`) runs the command line."""
import sys

from evoprune.cli import main

sys.exit(main())
