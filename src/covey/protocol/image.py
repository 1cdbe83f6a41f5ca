"""The image task: ``paint`` → ``progress``* → ``painted`` | ``error``.

Images travel as base64 PNG. Usage is in tiles of 256 × 256 pixels (rounded up) over all
images, so a request is billed per image and by its size: a 512 × 512 image is 4 tiles, a
1024 × 1024 one 16. A receipt's ``output_sha256`` is :func:`images_digest` of the images.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Literal

from pydantic import Field

from covey.protocol.wire import Base64, JobId, Receipt, Sha256Hex, _Frame

MAX_IMAGES = 10
"""Images per request, as OpenAI's ``n``."""
TILE = 256
"""A billing tile's side in pixels."""


def tiles(width: int, height: int, n: int = 1) -> int:
    """Billed units of ``n`` images of ``width`` × ``height`` pixels (256-pixel tiles,
    rounded up per image)."""
    return n * math.ceil(width / TILE) * math.ceil(height / TILE)


class Paint(_Frame):
    """Task: ``n`` images of ``width`` × ``height`` for ``prompt``, denoised in ``steps``
    steps (None: the model's default), image ``i`` from seed ``seed + i`` (so a seed fixes
    every image, and re-checks regenerate them)."""

    type: Literal["paint"] = "paint"
    job_id: JobId
    model: str
    model_sha256: Sha256Hex | None = None
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    width: int = Field(ge=8, le=4096)
    height: int = Field(ge=8, le=4096)
    seed: int = Field(ge=0, lt=2**32)
    steps: int | None = Field(default=None, ge=1, le=200)

    @property
    def tiles(self) -> int:
        """The task's billed units (:func:`tiles`)."""
        return tiles(self.width, self.height, self.n)


class Painted(_Frame):
    """The images (base64 PNG, in seed order) and ``tiles``, the billed usage. ``receipt``
    (``prompt_tokens`` holds ``tiles``) and ``signature`` are added by the agent."""

    type: Literal["painted"] = "painted"
    job_id: JobId
    images: tuple[Base64, ...] = Field(min_length=1, max_length=MAX_IMAGES)
    tiles: int = Field(ge=0)
    receipt: Receipt | None = None
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


def images_digest(images: Iterable[str]) -> str:
    """SHA-256 (hex) over the images' base64 texts in order: an image receipt's
    ``output_sha256``."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(hashlib.sha256(image.encode()).digest())
    return digest.hexdigest()
