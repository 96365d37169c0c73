"""An embedded image task: procedurally drawn shapes to classify; nothing is downloaded.

``Shapes`` draws one filled shape per grey-scale image - a circle, a square, a triangle or a cross -
at a random (sub-pixel) position and size, with a random brightness, on a dark background, then adds
Gaussian noise. The label is the shape. Every image is a pure function of (seed, split, batch index),
as for every task (``seqblocks.tasks.base``).

Under the task contract a batch holds ``input_ids`` and ``targets``; an image batch (``ImageBatch``)
holds the images [B, 1, H, W] (float32) in ``input_ids`` and the labels [B, 1] in ``targets``: one
scored position per row, so ``seqblocks train`` / ``evaluate`` score a classifier's [B, K] logits as
[B, 1, K] and report classification accuracy as ``acc``.

Shapes: B batch, H height, W width, K classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from seqblocks.tasks.base import Batch, Task

__all__ = ["ImageBatch", "Shapes", "SHAPE_NAMES", "draw_shapes"]

SHAPE_NAMES = ("circle", "square", "triangle", "cross")


@dataclasses.dataclass
class ImageBatch(Batch):
    """A batch of images and labels under the ``Batch`` contract.

    Attributes:
        input_ids (Tensor): [B, C, H, W] float32 images (the model input).
        targets (Tensor): [B, 1] int64 labels.
    """

    def __getitem__(self, rows: slice) -> ImageBatch:
        return ImageBatch(self.input_ids[rows], self.targets[rows])

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(self.input_ids.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))

    @property
    def images(self) -> torch.Tensor:
        return self.input_ids

    @property
    def labels(self) -> torch.Tensor:
        """[B] int64."""
        return self.targets[:, 0]


def draw_shapes(labels: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor,
                image_size: int) -> torch.Tensor:
    """Filled shapes as {0, 1} masks [B, H, W] (H = W = ``image_size``), one per row.

    Args:
        labels (Tensor): [B] int, an index into ``SHAPE_NAMES``.
        cx, cy (Tensor): [B] float centre (pixels; x rightwards, y downwards).
        radius (Tensor): [B] float half-extent r of the shape.
        image_size (int): H = W.

    A circle is the disc of radius r; a square the axis-aligned square of half-side 0.8 r (about the
    disc's area); a triangle points up, apex at (cx, cy - r), base from (cx - r, cy + r) to
    (cx + r, cy + r); a cross is a horizontal and a vertical bar of length 2r and half-width r / 3.
    """
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
    x, y = coords[None, None, :], coords[None, :, None]  # [1, 1, W], [1, H, 1]
    cx, cy, r = cx[:, None, None], cy[:, None, None], radius[:, None, None]  # [B, 1, 1]
    dx, dy = x - cx, y - cy  # [B, H, W]
    circle = dx.square() + dy.square() <= r.square()
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r
    triangle = (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)
    half = torch.clamp(r / 3, min=0.75)
    cross = ((dx.abs() <= half) & (dy.abs() <= r)) | ((dy.abs() <= half) & (dx.abs() <= r))
    masks = torch.stack((circle, square, triangle, cross), dim=1)  # [B, 4, H, W]
    return masks[torch.arange(labels.shape[0]), labels].float()


class Shapes(Task):
    """Classify procedurally drawn shapes: circle, square, triangle, cross.

    Args:
        image_size (int): H = W, at least 8. Default: 16.
        num_classes (int): how many of the shapes (the first ``num_classes`` of ``SHAPE_NAMES``), 2 to 4.
            Default: 4.
        min_radius (float): smallest half-extent of a shape, in pixels. Default: 3.5.
        max_radius (float): largest; at most image_size / 2 - 1. Default: 6.5.
        noise (float): standard deviation of the Gaussian pixel noise. Default: 0.1.
        eval_examples (int): held-out set size. Default: 512.

    Raises:
        ValueError: sizes out of range.
    """

    name: ClassVar[str] = "shapes"
    description: ClassVar[str] = ("images: classify a procedurally drawn circle / square / triangle / cross "
                                  "(16 x 16, noisy)")
    #: what trains on it (``seqblocks.train.models``): an image classifier
    kind: ClassVar[str] = "image"
    #: the preset ``seqblocks train --task shapes`` uses when no --config is given
    default_preset: ClassVar[str] = "vit-tiny"

    def __init__(self, image_size: int = 16, num_classes: int = 4, min_radius: float = 3.5, max_radius: float = 6.5,
                 noise: float = 0.1, *, eval_examples: int = 512) -> None:
        super().__init__(eval_examples=eval_examples)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"shapes: image_size={image_size!r} must be an int >= 8")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= 4:
            raise ValueError(f"shapes: num_classes={num_classes!r} must be 2, 3 or 4 (of {SHAPE_NAMES})")
        if not 1.0 <= min_radius <= max_radius <= image_size / 2 - 1:
            raise ValueError(f"shapes: need 1 <= min_radius ({min_radius}) <= max_radius ({max_radius}) <= "
                             f"image_size / 2 - 1 = {image_size / 2 - 1}")
        if not noise >= 0:
            raise ValueError(f"shapes: noise={noise!r} must be >= 0")
        self.image_size, self.num_classes = image_size, num_classes
        self.min_radius, self.max_radius, self.noise = float(min_radius), float(max_radius), float(noise)

    @property
    def vocab_size(self) -> int:
        """The number of classes: the width of the logits the model must produce."""
        return self.num_classes

    @property
    def seq_len(self) -> int:
        """One scored position (the label) per image."""
        return 1

    @property
    def class_names(self) -> tuple[str, ...]:
        return SHAPE_NAMES[: self.num_classes]

    def config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "num_classes": self.num_classes, "min_radius": self.min_radius,
                "max_radius": self.max_radius, "noise": self.noise, "eval_examples": self.eval_examples}

    def model_fields(self) -> dict[str, Any]:
        """What the model must match: classes, image size and one channel."""
        return {"num_classes": self.num_classes, "image_size": self.image_size, "num_channels": 1}

    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> ImageBatch:
        B, S = batch_size, self.image_size
        labels = torch.randint(0, self.num_classes, (B,), generator=generator)
        u = torch.rand(B, 4, generator=generator)
        radius = self.min_radius + (self.max_radius - self.min_radius) * u[:, 0]
        # The centre keeps the whole shape inside the image.
        cx = radius + (S - 2 * radius) * u[:, 1]
        cy = radius + (S - 2 * radius) * u[:, 2]
        brightness = 0.6 + 0.4 * u[:, 3]
        images = draw_shapes(labels, cx, cy, radius, S) * brightness[:, None, None]
        images = images + self.noise * torch.randn(B, S, S, generator=generator)
        return ImageBatch(images[:, None].contiguous(), labels[:, None])

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.class_names[i] if 0 <= i < self.num_classes else str(i) for i in ids)
