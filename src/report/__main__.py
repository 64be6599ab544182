"""`python -m src.report PATH [PATH ...] [options]`: see the package docstring."""

from src.report.cli import main

main()
