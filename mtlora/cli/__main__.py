"""`python -m mtlora.cli`: the `mtlora` command line, as the console script runs it."""

from mtlora.cli import main

main()
