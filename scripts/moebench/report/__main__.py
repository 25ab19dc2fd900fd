"""`python -m moebench.report ...`: the report's command line (moebench.report.pages)."""
from .pages import main

main()
