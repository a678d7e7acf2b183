"""The mechanics every package of the project shares, below all of them: `mtlora`, `engines`,
`calibration` and `export` may import it, and it imports none of them (nor torch, nor an SDK).

`files`: atomic file writes and staging directories published by rename.
`cli`: the click group both command lines use (one-line errors, exit codes, SIGTERM as Ctrl-C, `--debug`).
`numbers`: counting non-finite values.
"""
