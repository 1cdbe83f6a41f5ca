"""Text-to-image models with diffusers: a Stable-Diffusion-family pipeline folder, as
``pipeline.save_pretrained`` writes it.

Image ``i`` of a task is denoised alone from seed ``seed + i``, its starting noise drawn by
a CPU generator, so an image's bytes depend only on (model, prompt, size, steps, seed + i)
and the hardware's arithmetic: a validator can regenerate any one image of a task, and a
CPU and a GPU start from the same noise. Images are PNG without metadata, base64.

:func:`build_tiny_pipeline` writes a tiny randomly initialised Stable Diffusion pipeline
(about 2 MB, a 64 × 64 image in a fraction of a second on one CPU thread) for tests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from covey.miner.backends.base import BackendError, ImageBackend, thread_reporter
from covey.protocol import ModelOffer, Paint, Painted

SIZE_MULTIPLE = 8
"""Width and height must be multiples of this many pixels (Stable Diffusion's VAE works in
8-pixel latent cells; diffusers refuses other sizes)."""

Progress = Callable[[int], None]
"""Told the denoising steps done so far over all of a task's images, after each step."""


@dataclass(frozen=True)
class ImageConfig:
    """How to serve a pipeline.

    ``threads``: torch's CPU threads (None: 1; one process-wide setting); ``steps``:
    denoising steps when a task gives none; ``max_side``: the largest width or height in
    pixels; ``sizes``: the sizes announced in the offer, ``WIDTHxHEIGHT``, the default first
    (None: the model's native square, then half and twice its side where they fit
    ``max_side``); ``device``: ``cuda``, ``cpu`` … (None: CUDA when available, else CPU);
    ``dtype``: the weights' type (None: float16 on CUDA, float32 on CPU); ``ask_prompt``:
    asking price in µcr per 1M 256-pixel tiles.
    """

    threads: int | None = None
    steps: int = 20
    max_side: int = 1024
    sizes: tuple[str, ...] | None = None
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    ask_prompt: int = 0


class _Steps:
    """diffusers' ``callback_on_step_end`` for one task: reports the steps done over all
    its images (``before`` those of the images already made) and stops a cancelled task."""

    def __init__(self, cancel: threading.Event, report: Progress) -> None:
        self.cancel = cancel
        self.report = report
        self.before = 0
        self.done = 0

    def check(self) -> None:
        """Raises: BackendError: ``cancelled`` once the task is cancelled."""
        if self.cancel.is_set():
            raise BackendError("cancelled", "the task was cancelled")

    def __call__(self, _pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]
                 ) -> dict[str, Any]:
        self.check()  # diffusers lets the error through: the denoising stops at this step
        self.done = self.before + index + 1
        self.report(self.done)
        return tensors


def _quiet_imports() -> None:
    # Read when the libraries are first imported: they advise at import time.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _quiet() -> None:
    """Keep diffusers' and transformers' progress bars and advice out of a miner's log
    (loading bars, optional packages it could use); errors still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _load(path: Path, config: ImageConfig) -> tuple[Any, str]:
    """The pipeline at ``path`` on its device, and that device's name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask a hub
    _quiet_imports()
    import torch
    from diffusers import AutoPipelineForText2Image

    _quiet()
    torch.set_num_threads(config.threads or 1)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.dtype) if config.dtype else (
        torch.float16 if device.startswith("cuda") else torch.float32)
    index = json.loads((path / "model_index.json").read_text())
    # The miner answers for its images itself; loading SD's safety checker would cost
    # 1.2 GB and blank images that a validator's copy (without it) would not.
    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} \
        if "safety_checker" in index else {}
    pipe = AutoPipelineForText2Image.from_pretrained(
        str(path), local_files_only=True, dtype=dtype, **extra)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device


def _twin(pipe: Any) -> Any:
    """A pipeline sharing ``pipe``'s weights with a scheduler of its own: a scheduler keeps
    the running task's timesteps, so two tasks at once need two."""
    components = dict(pipe.components)
    components["scheduler"] = pipe.scheduler.from_config(pipe.scheduler.config)
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in pipe.config \
        else {}
    twin = type(pipe)(**components, **extra)
    twin.set_progress_bar_config(disable=True)
    return twin


class DiffusersBackend(ImageBackend):
    """Serves the diffusers pipeline folder at ``path`` with ``slots`` tasks at once.

    ``context_length`` in the offer is the text encoder's prompt limit in tokens (77 for
    Stable Diffusion); a longer prompt is cut there, as diffusers does.

    Raises (from the constructor):
        ValueError: the folder is not a diffusers text-to-image pipeline.
    """

    def __init__(self, name: str, path: Path, sha256: str, slots: int = 1,
                 config: ImageConfig = ImageConfig()) -> None:
        try:
            pipe, self.device = _load(path, config)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path} is not a diffusers text-to-image pipeline: {exc}"
                             ) from exc
        self.config = config
        self.slots = slots
        self._gate = asyncio.Semaphore(slots)
        # Pipelines are taken and given back by the worker threads, not by the coroutines:
        # a cancelled task's thread still runs until its next step and must keep its
        # pipeline until then.
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._free.put(pipe)
        for _ in range(slots - 1):
            self._free.put(_twin(pipe))
        self._pipes = slots
        tokenizer = getattr(pipe, "tokenizer", None)
        limit = int(getattr(tokenizer, "model_max_length", 77))
        sizes = config.sizes or _default_sizes(pipe, config.max_side)
        for size in sizes:
            width, height = (int(x) for x in size.split("x"))
            try:
                self._check_size(width, height, name)
            except BackendError as exc:
                raise ValueError(f"configured size {size}: {exc.message}") from None
        self.offer = ModelOffer(name=name, sha256=sha256, context_length=min(limit, 2**24),
                                backend="diffusers", kind="image", sizes=sizes,
                                ask_prompt=config.ask_prompt)

    async def paint(self, task: Paint, progress: Progress | None = None) -> Painted:
        """Generate ``task.n`` images of ``task.width`` × ``task.height`` pixels in
        ``task.steps`` (or the config's) denoising steps; see :meth:`ImageBackend.paint`.

        Raises:
            BackendError: ``invalid_value`` (param ``size``) for a side that is not a
                multiple of :data:`SIZE_MULTIPLE` or is over ``max_side``.
        """
        self._check_size(task.width, task.height, self.offer.name)
        cancel = threading.Event()
        report = thread_reporter(progress)
        async with self._gate:
            try:
                return await asyncio.to_thread(self._paint, task, cancel, report)
            finally:
                cancel.set()  # a cancelled task's thread stops at its next step

    def _check_size(self, width: int, height: int, name: str) -> None:
        """Refuse a size the model cannot make. Any multiple of :data:`SIZE_MULTIPLE` up to
        ``max_side`` is made, not only the offer's ``sizes`` (those the coordinator asks
        for).

        Raises:
            BackendError: ``invalid_value`` (param ``size``).
        """
        side = self.config.max_side
        if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE or max(width, height) > side:
            raise BackendError("invalid_value", f"{width}x{height} is not a size "
                               f"{name} makes: width and height must be "
                               f"multiples of {SIZE_MULTIPLE} pixels, at most {side}.",
                               "size")

    def _paint(self, task: Paint, cancel: threading.Event, report: Progress) -> Painted:
        pipe = self._free.get()
        try:
            steps = _Steps(cancel, report)
            images = []
            for i in range(task.n):
                steps.check()
                images.append(_png_base64(self._one(pipe, task, task.seed + i, steps)))
                steps.before = steps.done
            return Painted(job_id=task.job_id, images=tuple(images), tiles=task.tiles)
        finally:
            self._free.put(pipe)

    def _one(self, pipe: Any, task: Paint, seed: int, steps: _Steps) -> Any:
        """One PIL image from ``seed``."""
        import torch

        # A CPU generator draws the same starting noise on every device (a CUDA one would
        # not), so a GPU miner's image is checked against a CPU validator's.
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe(prompt=task.prompt, width=task.width, height=task.height,
                   num_inference_steps=task.steps or self.config.steps, generator=generator,
                   callback_on_step_end=steps, output_type="pil")
        return out.images[0]

    def close(self) -> None:
        """Drop the pipelines (once no task holds one) and CUDA's cached memory."""
        for _ in range(self._pipes):
            self._free.get()
        self._pipes = 0
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _default_sizes(pipe: Any, max_side: int) -> tuple[str, ...]:
    """The model's native square (the UNet's sample size in pixels: 512 for Stable
    Diffusion 1.x, 1024 for SDXL), then half and twice its side where they fit."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    native = int(pipe.unet.config.sample_size) * scale if getattr(pipe, "unet", None) \
        else 512
    fits = [side for side in (native, native // 2, native * 2)
            if side % SIZE_MULTIPLE == 0 and SIZE_MULTIPLE <= side <= max_side]
    if not fits:
        fits = [max_side - max_side % SIZE_MULTIPLE]
    return tuple(f"{side}x{side}" for side in fits)


def _png_base64(image: Any) -> str:
    """``image`` (PIL) as base64 PNG: no text chunks, fixed compression, so the same pixels
    always give the same bytes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=6, optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def build_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Stable Diffusion pipeline to ``folder`` and return ``folder``.

    The real classes at toy sizes, weights drawn from ``torch.manual_seed(seed)`` (the same
    seed writes the same weights): a 2-layer CLIP text encoder of width 32 with a byte-level
    tokenizer (no merges; 77 tokens), a 2-level UNet (16 and 32 channels), a 3-level VAE
    (4 × downsampling) and a DDIM scheduler. Any width and height that are multiples of 8
    pixels work. Its images are noise-like patterns, not pictures; they depend on prompt
    and seed like a real model's.
    """
    import tempfile

    _quiet_imports()
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _quiet()
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="covey-tokenizer-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(_write_byte_vocab(Path(tmp)))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=64)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def _write_byte_vocab(folder: Path) -> Path:
    """A CLIP tokenizer's files in ``folder``: the 256 byte characters of byte-level BPE,
    each also as a word's last piece (``</w>``), then ``<|startoftext|>`` and
    ``<|endoftext|>``; no merges, so each byte is a token."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}))
    return folder


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table (byte ``b`` is ``_byte_chars()[b]``), which CLIP's
    byte-level pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
