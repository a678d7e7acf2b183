"""`python -m export.cli ...`: the `mtlora-export` command line."""

from export.cli import main

main()
