"""densegrpo plugin: the ImageReward reward (``imagereward``), on image-reward 1.5's own code.

Importing this package is cheap: the model and image-reward's modules load when a reward is built.
"""

__version__ = "0.1.0"
