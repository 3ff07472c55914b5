"""densegrpo rewards ``pickscore`` and ``clipscore`` on transformers CLIP models.

Importing this package loads no model and no transformers code; the reward classes live in
``densegrpo_pickscore.pickscore`` and ``densegrpo_pickscore.clipscore``.
"""

__version__ = "0.1.0"
