"""Image I/O and sample grids. Images are float32 ``(N,3,H,W)`` in [0, 1] everywhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from densegrpo.contracts.errors import UserError


def load_images(paths: Sequence[str | Path]) -> list[torch.Tensor]:
    """Read image files as ``(3,H,W)`` float32 tensors in [0, 1] (sizes may differ)."""
    out = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"'{path}' is a folder, not an image file; pass the images in it (e.g. {path}/*.png)")
        if not path.is_file():
            raise UserError(f"image file '{path}' does not exist; check the path")
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        except OSError as error:
            raise UserError(f"'{path}' is not a readable image ({error}); pass a PNG or JPEG file") from None
        out.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
    return out


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3,H,W)`` float in [0,1] -> PIL RGB image."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round()
    return Image.fromarray(array.astype(np.uint8))


def make_grid(
    images: torch.Tensor, captions: Sequence[str] | None = None, columns: int | None = None, scale: int = 4
) -> Image.Image:
    """Tile ``images (N,3,H,W)`` into one picture, upscaled ``scale``x (nearest), with optional captions.

    ``videos (N,F,3,H,W)`` show each video as a strip of its frames (see :func:`frame_strip`).
    """
    if images.ndim == 5:
        images = frame_strip(images)
    count = int(images.shape[0])
    columns = columns or min(count, 8)
    rows = (count + columns - 1) // columns
    height, width = int(images.shape[2]) * scale, int(images.shape[3]) * scale
    caption_h = 24 if captions else 0
    pad = 4
    canvas = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for index in range(count):
        r, c = divmod(index, columns)
        x, y = pad + c * (width + pad), pad + r * (height + caption_h + pad)
        canvas.paste(to_pil(images[index]).resize((width, height), Image.NEAREST), (x, y))
        if captions:
            text = _wrap(captions[index], max(8, width // 6))
            draw.multiline_text((x, y + height + 1), text, fill="black", spacing=0)
    return canvas


def frame_strip(videos: torch.Tensor, frames: int = 4) -> torch.Tensor:
    """``videos (N,F,3,H,W)`` -> ``(N,3,H,k*W)``: ``k = min(frames, F)`` frames evenly spaced from first to last, side by side."""
    count = int(videos.shape[1])
    picked = torch.linspace(0, count - 1, min(frames, count)).round().long()
    return torch.cat(list(videos[:, picked].unbind(1)), dim=-1)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:2])


def check_output_file(path: str | Path, option: str = "--out") -> None:
    """Fail before any work when ``path`` cannot become a file: it is a folder, or a folder
    above it is a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} '{path}' is a folder; pass a file name such as {path / 'grid.png'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{option} '{path}' cannot be written: '{parent}' is a file, not a folder")


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(handle)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
