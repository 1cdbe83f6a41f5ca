"""The transformers backend for a shard: a block range of a decoder-only model.

``covey miner --model NAME --blocks 0:15`` serves blocks 0–14 of NAME (a GGUF file, which
transformers reads and dequantizes, or a transformers folder of the Llama/Qwen family).
The first shard also holds the token embeddings, the last the final norm and the LM head;
every shard holds the rotary embedding and the tokenizer (the first tokenizes the prompt,
the last decodes the answer). Each chain session keeps its own KV cache here
(:class:`_Session`); the coordinator relays hidden states between shards
(:mod:`covey.protocol.shard`). A GGUF's dequantized weights are kept after the first start
(:func:`load_float_model`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covey.miner.backends.base import BackendError, ShardBackendBase
from covey.protocol import ModelOffer
from covey.protocol.shard import Forward, Forwarded, Tensor, tensor_digest
from covey.protocol.text import StreamDecoder
from covey.protocol.wire import ShardRange

log = logging.getLogger("covey.miner.shard")

MAX_SESSIONS = 64
"""Chain sessions kept at once; the least recently used is dropped beyond it."""
SESSION_IDLE_S = 300.0
"""A session untouched this long is dropped (its client is gone and its end was lost)."""
_TORCH_DTYPES = ("float16", "bfloat16", "float32")


def cache_root() -> Path:
    """Where dequantized GGUF weights are kept: ``$COVEY_SHARD_CACHE`` or
    ``~/.cache/covey/shards``."""
    env = os.environ.get("COVEY_SHARD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "covey" / "shards"


def load_float_model(path: Path, sha256: str) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 from a GGUF file or a transformers folder.

    transformers reads a GGUF and dequantizes it: about 18 s for SmolLM2-135M here, most
    of it building the model and the tokenizer. So the float weights, config and tokenizer
    are saved once under :func:`cache_root` by the weights' digest (safetensors, written to
    a temporary folder and renamed, so miners starting together never read half a copy);
    later starts load them in about 0.4 s.

    Raises:
        ValueError / OSError: transformers cannot read the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = path if path.is_dir() else cache_root() / sha256[:32]
    if not path.is_dir() and not (folder / "model.safetensors").is_file():
        from safetensors.torch import save_model

        log.info("dequantizing %s (once; kept in %s)", path.name, folder)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))  # tied weights stored once
            with contextlib.suppress(OSError):  # another miner's copy landed first
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return model, tokenizer
    return (AutoModelForCausalLM.from_pretrained(folder, dtype="float32"),
            AutoTokenizer.from_pretrained(folder))


def count_blocks(path: Path) -> int:
    """The decoder blocks of the model at ``path`` (a GGUF file's ``<arch>.block_count``, or
    a transformers folder's ``num_hidden_layers``), read without loading the weights.

    Raises:
        ValueError: neither says.
    """
    if path.is_dir():
        import json

        config = json.loads((path / "config.json").read_text())
        if "num_hidden_layers" not in config:
            raise ValueError(f"{path}/config.json does not say how many blocks it has")
        return int(config["num_hidden_layers"])
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    field = fields.get(f"{arch}.block_count")
    if field is None:
        raise ValueError(f"{path.name} does not say how many blocks it has")
    return int(field.parts[-1][0])


def split_blocks(total: int, shards: int) -> list[tuple[int, int]]:
    """``total`` blocks in ``shards`` contiguous ranges as even as can be, the larger
    first: 30 in 2 → [(0, 15), (15, 30)]; 30 in 4 → [(0, 8), (8, 16), (16, 23), (23, 30)].

    Raises:
        ValueError: fewer blocks than shards, or no shard.
    """
    if not 1 <= shards <= total:
        raise ValueError(f"cannot split {total} blocks in {shards} shards")
    size, extra = divmod(total, shards)
    out, start = [], 0
    for i in range(shards):
        end = start + size + (i < extra)
        out.append((start, end))
        start = end
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet reversed, token characters → bytes: printable
    bytes stand for themselves, the others are moved to code points from 256 up (the
    table of OpenAI's GPT-2 ``encoder.py``, which byte-level BPE tokenizers share)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


@dataclass
class _Session:
    """One chain session's state on this shard: its KV ``cache`` (positions held:
    ``position``), and on the last shard the answer so far (``generated``), the
    stop-string decoder and the sampler's seed."""

    cache: Any
    position: int = 0
    generated: list[int] = field(default_factory=list)
    decoder: StreamDecoder | None = None
    seed: int = 0
    touched: float = field(default_factory=time.monotonic)


class ShardBackend(ShardBackendBase):
    """Serves blocks ``blocks`` of a model (capability ``forward``); a step may run part
    of them (a chain through overlapping shards), the same part for all of a session.

    ``activations`` is the dtype of the hidden states it sends (float16 halves the bytes
    of float32; the greedy answer may then differ from the unsharded one at a near-tie).

    Raises (from the constructor):
        ValueError: the range does not fit the model's blocks.
    """

    def __init__(self, name: str, path: Path, sha256: str, blocks: tuple[int, int | None],
                 slots: int = 4, ctx: int = 2048, threads: int | None = 1,
                 activations: str = "float32", ask_prompt: int = 0,
                 ask_completion: int = 0, rebalance: bool = False) -> None:
        import torch

        self._settings = {"name": name, "path": path, "sha256": sha256, "slots": slots,
                          "ctx": ctx, "threads": threads, "activations": activations,
                          "ask_prompt": ask_prompt, "ask_completion": ask_completion,
                          "rebalance": rebalance}

        if activations not in _TORCH_DTYPES:
            raise ValueError(f"activations must be one of {', '.join(_TORCH_DTYPES)}")
        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = load_float_model(path, sha256)
        model.eval()
        inner = model.model
        total = len(inner.layers)
        start, end = blocks[0], blocks[1] if blocks[1] is not None else total
        if not 0 <= start < end <= total:
            raise ValueError(f"blocks {start}:{end} do not fit this model's {total} blocks "
                             f"(0:{total})")
        self.range = ShardRange(start=start, end=end, total=total)
        self.layers = list(inner.layers[start:end])
        for i, layer in enumerate(self.layers):  # this shard's cache holds only its blocks
            layer.self_attn.layer_idx = i
        self.embed = inner.embed_tokens if self.range.first else None
        self.norm = inner.norm if self.range.last else None
        self.head = model.lm_head if self.range.last else None
        self.rotary = inner.rotary_emb
        # transformers 5 calls a decoder layer's KV cache `cache`; 4.x `past_key_values`.
        self._cache_arg = ("cache" if "cache" in inspect.signature(
            type(self.layers[0]).forward).parameters else "past_key_values")
        self.config = model.config
        self.hidden_size = int(model.config.hidden_size)
        self.n_vocab = int(model.config.vocab_size)
        self.n_ctx = min(ctx, int(getattr(model.config, "max_position_embeddings", ctx)))
        self.tokenizer = tokenizer
        self.eos_ids = _eos_ids(model, tokenizer)
        self.activations = activations
        inner.layers = type(inner.layers)(self.layers)  # the rest is freed
        if not self.range.first:
            inner.embed_tokens = None
        if not self.range.last:
            inner.norm = None
            model.lm_head = None
        self.model = model
        self.slots = slots
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = _byte_decoder()
        self.offer = ModelOffer(name=name, sha256=sha256, context_length=self.n_ctx,
                                backend="transformers", ask_prompt=ask_prompt,
                                ask_completion=ask_completion, shard=self.range,
                                rebalance=rebalance)

    # -- the task --------------------------------------------------------------------

    async def forward(self, task: Forward) -> Forwarded:
        """Run one step of ``task.session`` (see :class:`~covey.protocol.shard.Forward`).

        Raises:
            BackendError: ``invalid_value`` (blocks other than this shard's, a position
                that does not follow the session, a tensor of the wrong shape, token ids
                outside the vocabulary), ``invalid_prompt`` / ``context_length_exceeded``
                for the first step's prompt.
        """
        if (task.blocks.start < self.range.start or task.blocks.end > self.range.end
                or task.blocks.total != self.range.total):
            raise BackendError("invalid_value", f"this shard holds blocks {self.range} of "
                               f"{self.range.total}, not {task.blocks}", "blocks")
        return await asyncio.to_thread(self._locked_step, task)

    def moved(self, start: int, end: int) -> ShardBackend:
        """This backend's model and settings with blocks ``start:end`` (about a second
        from the kept float weights).

        Raises:
            ValueError: the range does not fit the model.
        """
        settings = dict(self._settings)
        name, path, sha256 = settings.pop("name"), settings.pop("path"), settings.pop("sha256")
        return ShardBackend(name, path, sha256, (start, end), **settings)  # type: ignore[arg-type]

    def drop(self, session: str) -> None:
        """Forget ``session``'s cache (the generation ended)."""
        with self._lock:
            self._sessions.pop(session, None)

    def _locked_step(self, task: Forward) -> Forwarded:
        with self._lock:
            began = time.perf_counter()
            reply = self._step(task)
            return reply.model_copy(update={
                "compute_ms": round((time.perf_counter() - began) * 1000, 3)})

    def _step(self, task: Forward) -> Forwarded:
        import torch

        self._expire()
        if task.position == 0:
            self._sessions.pop(task.session, None)
            sess = self._new_session(task)
        else:
            sess = self._sessions.get(task.session)
            if sess is None or sess.position != task.position:
                have = sess.position if sess is not None else 0
                raise BackendError("invalid_value", f"session {task.session} holds {have} "
                                   f"positions here, not {task.position}", "position")
        self._sessions.move_to_end(task.session)
        sess.touched = time.monotonic()
        blocks = task.blocks
        layers = self.layers[blocks.start - self.range.start:blocks.end - self.range.start]
        with torch.inference_mode():
            if blocks.first:
                ids = self._input_ids(task)
                hidden = self.embed(torch.tensor([ids], dtype=torch.long))
            else:
                hidden = self._hidden_in(task)
            steps = hidden.shape[1]
            if sess.position + steps > self.n_ctx:
                raise BackendError("context_length_exceeded", f"This model's maximum context "
                                   f"length is {self.n_ctx} tokens; the session would hold "
                                   f"{sess.position + steps}.", "messages")
            hidden = self._blocks(hidden, sess, layers)
        start = sess.position
        sess.position += steps
        emit = max(0, (task.emit_from if task.emit_from is not None else start) - start)
        if blocks.last and task.score_ids:
            reply = self._score(task, hidden, steps)
        elif not blocks.last or not task.sample:
            out = hidden[:, emit:, :].to(getattr(torch, self.activations)).contiguous()
            data = _tensor_bytes(out)
            reply = Forwarded(job_id=task.job_id, tokens=steps,
                              hidden=Tensor(shape=tuple(out.shape), dtype=self.activations),
                              input_sha256=tensor_digest(task), output_sha256="0" * 64,
                              data=data)
        else:
            reply = self._sample(task, sess, hidden[:, -1, :], steps)
        return reply.model_copy(update={"output_sha256": tensor_digest(reply)})

    def _new_session(self, task: Forward) -> _Session:
        from transformers import DynamicCache

        if len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        sess = _Session(cache=DynamicCache())
        if task.blocks.last:
            sess.decoder = StreamDecoder(task.params.stop)
            sess.generated = list(task.resume)
            sess.decoder.replay((self._piece(t) for t in task.resume), task.resume_chars)
            sess.seed = (task.params.seed if task.params.seed is not None
                         else int.from_bytes(os.urandom(8), "little"))
        self._sessions[task.session] = sess
        return sess

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._sessions.items() if now - s.touched > SESSION_IDLE_S]:
            del self._sessions[key]

    def _input_ids(self, task: Forward) -> list[int]:
        ids: list[int] = []
        if task.messages is not None:
            ids = self._template(task.messages)
        elif task.prompt is not None:
            ids = list(self.tokenizer(task.prompt, add_special_tokens=False)["input_ids"])
        param = "messages" if task.messages is not None else "prompt"
        if (task.messages is not None or task.prompt is not None) and not ids:
            raise BackendError("invalid_prompt", f"The {param} is empty.", param)
        if (task.messages is not None or task.prompt is not None) and len(ids) >= self.n_ctx:
            raise BackendError(
                "context_length_exceeded",
                f"This model's maximum context length is {self.n_ctx} tokens. However, your "
                f"{param} resulted in {len(ids)} tokens. Please reduce the length.", param)
        bad = next((t for t in task.token_ids if t >= self.n_vocab), None)
        if bad is not None:
            raise BackendError("invalid_value", f"token id {bad} is outside this model's "
                               f"vocabulary of {self.n_vocab}", "token_ids")
        return ids + list(task.token_ids)

    def _template(self, messages: Sequence[Any]) -> list[int]:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        out = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                 tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def _hidden_in(self, task: Forward) -> Any:
        import torch

        t = task.hidden
        if t is None or len(t.shape) != 3 or t.shape[0] != 1 or t.shape[2] != self.hidden_size \
                or t.shape[1] < 1:
            raise BackendError("invalid_value", "this shard takes hidden states of shape "
                               f"(1, tokens, {self.hidden_size})", "hidden")
        raw = torch.frombuffer(bytearray(task.data), dtype=getattr(torch, t.dtype))
        return raw.reshape(t.shape).to(torch.float32)

    def _blocks(self, hidden: Any, sess: _Session, layers: Sequence[Any]) -> Any:
        import torch

        steps = hidden.shape[1]
        past = sess.position
        positions = torch.arange(past, past + steps).unsqueeze(0)
        embeddings = self.rotary(hidden, positions)
        mask = None
        if steps > 1:  # causal over the cache and this step (additive: 0 or -inf)
            keys = torch.arange(past + steps)
            allowed = keys.unsqueeze(0) <= positions[0].unsqueeze(1)
            mask = torch.zeros(steps, past + steps).masked_fill(~allowed, float("-inf"))
            mask = mask[None, None]
        for layer in layers:
            out = layer(hidden, attention_mask=mask, position_ids=positions,
                        use_cache=True, cache_position=positions[0],
                        position_embeddings=embeddings, **{self._cache_arg: sess.cache})
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _score(self, task: Forward, hidden: Any, steps: int) -> Forwarded:
        """How the tokens ``task.score_ids`` fit this model's logits at the step's last
        positions (a validator re-checking a last shard's greedy answer).

        Raises:
            BackendError: ``invalid_value``, more tokens than positions or ids outside the
                vocabulary.
        """
        import torch

        ids = task.score_ids
        if len(ids) > steps or any(t >= self.n_vocab for t in ids):
            raise BackendError("invalid_value", f"{len(ids)} tokens to score over a step of "
                               f"{steps} positions", "score_ids")
        with torch.inference_mode():
            logits = self.head(self.norm(hidden[0, steps - len(ids):, :])).float()
        chosen = logits[torch.arange(len(ids)), torch.tensor(ids)]
        gaps = (logits.max(dim=-1).values - chosen).clamp(min=0).tolist()
        empty = Tensor(shape=(1, 0, self.hidden_size), dtype=self.activations)
        return Forwarded(job_id=task.job_id, tokens=steps, hidden=empty, gaps=tuple(gaps),
                         input_sha256=tensor_digest(task), output_sha256="0" * 64)

    def _sample(self, task: Forward, sess: _Session, last: Any, steps: int) -> Forwarded:
        import torch

        logits = self.head(self.norm(last))[0].float()
        params = task.params
        if params.presence_penalty or params.frequency_penalty:
            for t, n in Counter(sess.generated).items():
                logits[t] -= params.presence_penalty + params.frequency_penalty * n
        if params.temperature == 0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / params.temperature, dim=-1)
            if params.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            # One generator per position: any miner resuming the session draws the same.
            gen = torch.Generator().manual_seed(_step_seed(sess.seed, sess.position))
            token = int(torch.multinomial(probs, 1, generator=gen))
        sess.generated.append(token)
        decoder = sess.decoder
        assert decoder is not None
        stop = token in self.eos_ids or token in task.stop_ids
        text = "" if stop else decoder.feed(self._piece(token))
        if stop or task.final:
            text += decoder.finish()
        finish = "stop" if stop or decoder.stopped else None
        return Forwarded(job_id=task.job_id, tokens=steps, token_id=token, text=text,
                         finish_reason=finish, end_of_text=stop, input_sha256=tensor_digest(task),
                         output_sha256="0" * 64)

    def _piece(self, token: int) -> bytes:
        text = self.tokenizer.convert_ids_to_tokens(token)
        if text is None:
            return b""
        try:
            return bytes(self._bytes[c] for c in text)
        except KeyError:  # a special token, or a tokenizer that is not byte-level BPE
            return str(self.tokenizer.decode([token])).encode()


def _step_seed(seed: int, position: int) -> int:
    digest = hashlib.sha256(f"{seed}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _tensor_bytes(t: Any) -> bytes:
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move its bits as int16
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end an answer: the tokenizer's and generation config's end of
    sequence, and ChatML's end of turn when the vocabulary has it."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update([eos] if isinstance(eos, int) else list(eos or ()))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in vocab)
    return frozenset(ids)
