"""densegrpo rewards ``hpsv2`` and ``hpsv2.1`` (Human Preference Score) on hpsv2x.

Importing this package loads no model and does not import hpsv2; the reward classes live in
``densegrpo_hps.hpsv2`` and ``densegrpo_hps.hpsv21``.
"""

__version__ = "0.1.0"
