"""The mechanics every package of the project shares, below all of them: `mtlora`, `engines`,
`calibration` and `export` may import it, and it imports none of them (nor torch, nor an SDK).

`files`: atomic file writes and staging directories published by rename.
"""
