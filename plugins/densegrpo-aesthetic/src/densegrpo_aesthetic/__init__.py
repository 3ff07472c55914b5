"""densegrpo reward ``aesthetic``: the LAION aesthetic predictor on CLIP ViT-L/14.

Importing this package loads no model and no transformers code; the reward class lives in
``densegrpo_aesthetic.aesthetic``.
"""

__version__ = "0.1.0"
