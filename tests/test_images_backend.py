"""The diffusers image backend on a tiny randomly initialised Stable Diffusion pipeline:
seeds fix the images' bytes (across instances and processes), ``n`` images use consecutive
seeds, bad sizes are refused, progress counts steps, and cancelling stops the work."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402 - after the skips: pillow comes with the image extra

from covey.miner.backends.base import BackendError  # noqa: E402
from covey.miner.backends.diffusers import (  # noqa: E402
    DiffusersBackend,
    ImageConfig,
    build_tiny_pipeline,
)
from covey.miner.models import weights_sha256  # noqa: E402
from covey.protocol import Paint, Painted  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe")


@pytest.fixture(scope="module")
def backend(folder: Path) -> Iterator[DiffusersBackend]:
    backend = DiffusersBackend("tiny-sd", folder, weights_sha256(folder))
    try:
        yield backend
    finally:
        backend.close()


def _task(seed: int = 7, n: int = 1, width: int = 64, height: int = 64, steps: int = STEPS,
          prompt: str = "a lighthouse at dusk") -> Paint:
    return Paint(job_id="img-1", model="tiny-sd", prompt=prompt, n=n, width=width,
                 height=height, seed=seed, steps=steps)


def _paint(backend: DiffusersBackend, task: Paint) -> Painted:
    return asyncio.run(backend.paint(task))


def test_offer_announces_an_image_model(backend, folder):
    offer = backend.offer
    assert (offer.kind, offer.backend, offer.name) == ("image", "diffusers", "tiny-sd")
    assert offer.sha256 == weights_sha256(folder)
    assert offer.context_length == 77
    assert offer.sizes[0] == "64x64"  # the tiny UNet's native size
    assert backend.capabilities == {"paint"}


def test_images_are_metadata_free_pngs_of_the_size(backend):
    painted = _paint(backend, _task(width=128, height=64))
    assert painted.job_id == "img-1" and painted.tiles == 1 and len(painted.images) == 1
    data = base64.b64decode(painted.images[0])
    assert data.startswith(b"\x89PNG")
    assert not any(chunk in data for chunk in (b"tEXt", b"iTXt", b"zTXt", b"tIME"))
    with Image.open(io.BytesIO(data)) as image:
        assert (image.size, image.mode) == ((128, 64), "RGB")


def test_same_seed_gives_the_same_bytes_in_another_instance(backend, folder):
    first = _paint(backend, _task(seed=7))
    other = DiffusersBackend("tiny-sd", folder, backend.offer.sha256, slots=2)
    try:
        assert _paint(other, _task(seed=7)).images == first.images
    finally:
        other.close()


def test_same_seed_gives_the_same_bytes_in_another_process(backend, folder):
    script = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from covey.miner.backends.diffusers import DiffusersBackend
        from covey.protocol import Paint
        backend = DiffusersBackend("tiny-sd", Path({str(folder)!r}), "0" * 64)
        task = Paint.model_validate_json({_task(seed=11).model_dump_json()!r})
        print(asyncio.run(backend.paint(task)).images[0])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == _paint(backend, _task(seed=11)).images[0]


def test_the_same_seed_builds_the_same_weights(tmp_path, folder):
    assert weights_sha256(build_tiny_pipeline(tmp_path / "again")) == weights_sha256(folder)


def test_another_seed_or_prompt_gives_another_image(backend):
    base = _paint(backend, _task(seed=7)).images[0]
    assert _paint(backend, _task(seed=8)).images[0] != base
    assert _paint(backend, _task(seed=7, prompt="a red bicycle")).images[0] != base


def test_image_i_of_n_is_the_single_image_of_seed_plus_i(backend):
    both = _paint(backend, _task(seed=20, n=2))
    assert len(both.images) == 2 and both.tiles == 2
    assert both.images[0] == _paint(backend, _task(seed=20)).images[0]
    assert both.images[1] == _paint(backend, _task(seed=21)).images[0]


@pytest.mark.parametrize("width,height", [(100, 64), (64, 60), (1032, 64), (64, 2048)])
def test_a_size_the_model_cannot_make_is_refused(backend, width, height):
    with pytest.raises(BackendError) as refused:
        _paint(backend, _task(width=width, height=height))
    assert (refused.value.code, refused.value.param) == ("invalid_value", "size")


def test_configured_limits_and_sizes(folder):
    small = DiffusersBackend("tiny-sd", folder, "0" * 64, config=ImageConfig(
        max_side=128, sizes=("128x64", "64x64")))
    try:
        assert small.offer.sizes == ("128x64", "64x64")
        with pytest.raises(BackendError):
            _paint(small, _task(width=136))
    finally:
        small.close()
    with pytest.raises(ValueError, match="size"):
        DiffusersBackend("tiny-sd", folder, "0" * 64, config=ImageConfig(sizes=("60x60",)))
    with pytest.raises(ValueError, match="not a diffusers"):
        DiffusersBackend("tiny-sd", folder / "unet", "0" * 64)


def test_progress_counts_the_steps_of_all_images(backend):
    """The first step is reported at once, then at most one count a second (a report per
    step would wake the event loop for nothing), counting over all of a task's images."""
    seen: list[tuple[float, int]] = []
    asyncio.run(backend.paint(_task(n=2, steps=60),
                              lambda done: seen.append((time.monotonic(), done))))
    counts = [done for _, done in seen]
    assert counts[0] == 1 and counts == sorted(set(counts)) and counts[-1] <= 2 * 60
    assert all(b - a >= 0.99 for (a, _), (b, _) in zip(seen, seen[1:], strict=False))


def test_cancelling_stops_the_denoising(backend):
    seen: list[int] = []

    async def scenario() -> None:
        started = asyncio.Event()

        def progress(steps: int) -> None:
            seen.append(steps)
            started.set()

        # 10 images of 200 steps: about a minute of work if nothing stopped it.
        job = asyncio.create_task(backend.paint(_task(n=10, steps=200), progress))
        await asyncio.wait_for(started.wait(), 30)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        # With one slot the next task needs the cancelled task's pipeline back, which its
        # thread returns when it stops at its next step.
        after = await asyncio.wait_for(backend.paint(_task(seed=3)), 30)
        assert len(after.images) == 1

    asyncio.run(scenario())
    assert seen == sorted(seen) and seen[-1] < 200
