"""The component kinds (entry-point groups ``densegrpo.<kind>``). Kept torch-free."""

KINDS = ("policies", "samplers", "rewards", "advantages", "calibrators", "hooks")
"""The five protocols' components, and ``hooks``: bookkeeping run around the iterations
(:mod:`densegrpo.run.hooks`), which a package can register like any component."""
