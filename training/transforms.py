"""Training-time augmentation. Evaluation never augments: it uses serving.preprocess, the serving path itself.

- `random_resized_crop_flip`: torchvision's RandomResizedCrop (same sampling algorithm, including its fallback to a
  centre crop) + RandomHorizontalFlip, on a Pillow image, with an explicit numpy Generator so it is reproducible.
- `random_affine_uint8`: small random rotations/scales/shifts of a uint8 NHWC batch in one `grid_sample` call
  (LeNet-5's distortions, as in LeCun et al. 1998), returning uint8 so the network still sees the serving contract.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator,
                               scale: tuple[float, float] = RRC_SCALE, ratio: tuple[float, float] = RRC_RATIO
                               ) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop, by torchvision's `RandomResizedCrop.get_params` algorithm."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Ten misses (very elongated images): the largest centred crop whose aspect ratio is within range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(im: Image.Image, size: int, rng: np.random.Generator,
                             scale: tuple[float, float] = RRC_SCALE, ratio: tuple[float, float] = RRC_RATIO,
                             flip_p: float = 0.5) -> np.ndarray:
    """RGB/L picture → uint8 HWC `size`×`size` random crop (bilinear, antialiased like torchvision's PIL path)."""
    top, left, h, w = random_resized_crop_params(im.width, im.height, rng, scale, ratio)
    out = im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < flip_p:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a = np.asarray(out, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def random_affine_uint8(batch: torch.Tensor, generator: torch.Generator, degrees: float = 10.0,
                        scale: float = 0.1, shift_px: float = 2.0) -> torch.Tensor:
    """uint8 NHWC batch → the same batch, each image rotated by ±`degrees`, scaled by 1±`scale` and shifted by
    ±`shift_px` pixels (uniformly at random), bilinear, zero (background) fill. Parameters are drawn from
    `generator` on the CPU so results don't depend on the device."""
    n, h, w, _ = batch.shape
    draw = torch.rand(n, 4, generator=generator, dtype=torch.float32) * 2 - 1  # uniform in [-1, 1)
    angle = draw[:, 0] * math.radians(degrees)
    zoom = 1 + draw[:, 1] * scale
    # affine_grid maps output coords to input coords in [-1, 1]: the inverse transform, hence 1/zoom and -shift.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = -draw[:, 2] * shift_px * 2 / w, -draw[:, 3] * shift_px * 2 / h
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(batch.device)
    x = batch.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
