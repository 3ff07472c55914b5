"""A training run and its books: the run loop, its state, building components from a config, prompt batches,
hooks, checkpoints, preemption, evaluation, monitors and plots. Imports the method and the contracts.
"""
