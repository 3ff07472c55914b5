"""The built-in components, one per file and registered through entry points as any plugin's: advantages,
samplers, calibrators, policies and rewards. Imports only the public module :mod:`densegrpo.api`.
"""
