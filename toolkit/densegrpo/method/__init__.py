"""The algorithm: one GRPO iteration (rollout, rewards, advantages, clipped loss plus KL), the dense-reward
engine, sigmas, noise and the collectives it runs on. Imports only :mod:`densegrpo.contracts`.
"""
