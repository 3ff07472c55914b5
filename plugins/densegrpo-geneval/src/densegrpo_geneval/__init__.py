"""densegrpo plugin: the GenEval reward (``geneval``): Mask2Former + CLIP colour classifier on transformers.

Importing this package is cheap; the detector and CLIP load when the reward is built.
"""

__version__ = "0.1.0"
