"""`python -m moebench.audit`: the exit code is the level's (moebench.audit says which)."""
import sys

from .cli import main

sys.exit(main())
