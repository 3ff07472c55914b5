"""The face: the Typer command line (:mod:`densegrpo.cli.app`) and what its commands do beyond a run
(report, sample, score). May import every other part.
"""
