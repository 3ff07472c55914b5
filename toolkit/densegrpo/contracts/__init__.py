"""The contracts: the five protocols and their data, the registry, the run configuration, errors and the
helpers plugins use (hub weights, tokenizers, sharded tensors, contract tests). Imports nothing else of densegrpo.

Plugin authors import these names from :mod:`densegrpo.api`, not from here.
"""
