"""The five component kinds (entry-point groups ``densegrpo.<kind>``). Kept torch-free."""

KINDS = ("policies", "samplers", "rewards", "advantages", "calibrators")
