"""llama.cpp backend (llama-cpp-python): GGUF models on CPUs and small GPUs.

Each slot is its own ``Llama`` context (weights are mmapped, so slots share them in memory)
driven by its own single thread. Generation for a job stays on that thread from prefill to the
last token: llama-cpp-python's own server hands successive tokens to different threads of a
pool, and with llama.cpp's OpenMP workers that oversubscribes small machines and halves decode
speed. Sampling follows OpenAI's meanings: no top-k, no min-p, no repeat penalty unless asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from covey.miner import harness
from covey.miner.backends.base import BackendError, Capability, TextBackend
from covey.miner.backends.llama_eval import (
    PREFILL_CHUNK,
    eval_logits,
    last_logits,
    llama_seed,
    prefill,
)
from covey.miner.backends.scoring import token_stats
from covey.miner.backends.text import DeltaBuffer
from covey.miner.backends.watermark import GreenList, green_list
from covey.miner.models import ModelFile
from covey.protocol import (
    Check,
    CheckReport,
    Delta,
    Done,
    Generate,
    ModelOffer,
    Progress,
    Started,
)
from covey.protocol.text import StreamDecoder

log = logging.getLogger("covey.miner.llama_cpp")


@dataclass(frozen=True)
class LlamaCppConfig:
    """``n_ctx``: context length in tokens (0: the model's training length);
    ``n_threads``: CPU threads per slot (None: CPU count ÷ slots); ``n_batch``: prefill batch;
    ``n_gpu_layers``: layers to offload when llama.cpp was built with a GPU;
    ``stream_interval``: seconds between ``delta`` frames after the first (see
    :class:`~covey.miner.backends.text.DeltaBuffer`; 0 sends every token alone);
    ``ask_prompt`` / ``ask_completion``: asking price in µcr per 1M tokens."""

    n_ctx: int = 4096
    n_threads: int | None = None
    n_batch: int = 512
    n_gpu_layers: int = 0
    stream_interval: float = 0.02
    ask_prompt: int = 0
    ask_completion: int = 0


class _Slot:
    def __init__(self, index: int, llm: llama_cpp.Llama) -> None:
        self.llm = llm
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"llama-slot{index}")


class LlamaCppBackend(TextBackend):
    """Serves one GGUF model with ``slots`` concurrent generations.

    Raises (from the constructor):
        ValueError: llama.cpp cannot load the file.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {"generate", "validate", "tokenize"})

    def __init__(self, model: ModelFile, sha256: str, slots: int = 1,
                 config: LlamaCppConfig = LlamaCppConfig()) -> None:
        self.slots = slots
        self._stream_interval = config.stream_interval
        threads = config.n_threads or max(1, (os.cpu_count() or 1) // slots)
        self._slots = [
            _Slot(i, llama_cpp.Llama(
                model_path=str(model.path), n_ctx=config.n_ctx, n_threads=threads,
                n_threads_batch=threads, n_batch=config.n_batch,
                n_gpu_layers=config.n_gpu_layers, verbose=False,
            ))
            for i in range(slots)
        ]
        first = self._slots[0].llm
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        for slot in self._slots:
            self._free.put_nowait(slot)
        # A private model's dummy vocabulary aborts the process (a GGML_ASSERT, not an
        # exception) on any call that reads token text: such calls are never made for it.
        self._private = _vocabulary_less(first)
        self._formatter = None if self._private else _chat_formatter(first)
        self._pieces: dict[int, bytes] = {}
        self._eog: np.ndarray | None = None
        self.offer = ModelOffer(name=model.name, sha256=sha256, context_length=first.n_ctx(),
                                backend="llama.cpp", ask_prompt=config.ask_prompt,
                                ask_completion=config.ask_completion, private=self._private)

    def close(self) -> None:
        for slot in self._slots:
            slot.executor.shutdown(wait=True)
            slot.llm.close()

    def tokenize_job(self, llm: llama_cpp.Llama, job: Generate) -> list[int]:
        """Prompt token ids: ``job.prompt_ids`` as given (any model), else the chat template
        from the GGUF for chat, raw text otherwise.

        Raises:
            BackendError: the template rejects the messages, an id is outside the
                vocabulary, or text was sent to a private model (all ``invalid_value``).
        """
        if job.prompt_ids is not None:
            harness.check_ids(job.prompt_ids, llm.n_vocab(), "prompt_ids", "prompt_ids")
            return list(job.prompt_ids)
        if self._private:
            harness.refuse_text(job, self.offer.name)
        if job.messages is not None:
            if self._formatter is None:
                raise BackendError("invalid_value", "this model has no chat template; "
                                   "use /v1/completions", "messages")
            try:
                prompt = self._formatter(
                    messages=[{"role": m.role, "content": m.content} for m in job.messages]
                ).prompt
            except Exception as exc:  # jinja2 raise_exception → ValueError, or a TemplateError
                raise BackendError("invalid_value", f"chat template: {exc}", "messages") from exc
            return llm.tokenize(prompt.encode(), add_bos=False, special=True)
        return llm.tokenize((job.prompt or "").encode(), add_bos=True, special=True)

    def _piece(self, llm: llama_cpp.Llama, token: int) -> bytes:
        """The bytes of ``token`` (cached); always empty for a private model, whose answers
        are token ids only (its dummy tokens have no text, and detokenizing one aborts)."""
        if self._private:
            return b""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = llm.detokenize([token])
        return piece

    def _run(self, llm: llama_cpp.Llama, job: Generate,
             emit: Callable[[object], None], cancel: threading.Event) -> None:
        """The whole generation, on the slot's own thread; frames go out through ``emit``."""
        try:
            tokens = self.tokenize_job(llm, job)
            max_new = harness.admit(job, len(tokens), llm.n_ctx(), llm.n_vocab())
            resumed = list(job.resume.token_ids) if job.resume else []
            marker = self._green_list(llm, job)
            emit(Started(job_id=job.job_id, prompt_tokens=len(tokens)))
            p = job.params
            llm.set_seed(llama_seed(p.seed))
            if not prefill(llm, tokens, resumed, cancel, lambda n: emit(
                    Progress(job_id=job.job_id, prefilled=n)), exact=p.temperature == 0):
                emit(Done(job_id=job.job_id, finish_reason="cancelled",
                          prompt_tokens=len(tokens), completion_tokens=0))
                return
            decoder = harness.decoder_for(job, lambda t: self._piece(llm, t), self._private)
            out = DeltaBuffer(self._stream_interval, lambda text, ids: emit(
                Delta(job_id=job.job_id, text=text, token_ids=ids)))
            vocab = llm._model.vocab
            stop_ids = frozenset(job.stop_ids)
            generated = 0
            # A resumed job whose stop string was already complete has nothing more to say.
            finish = "stop" if decoder.stopped else "length"
            for token in [] if max_new <= 0 or decoder.stopped else llm.generate(
                tokens + resumed, top_k=0, top_p=p.top_p, min_p=0.0, typical_p=1.0,
                temp=p.temperature, repeat_penalty=1.0, reset=True,
                presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                # first in llama.cpp's chain: top-p and temperature act on biased logits
                logits_processor=llama_cpp.LogitsProcessorList([marker]) if marker else None,
            ):
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if token in stop_ids or llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                generated += 1
                text = decoder.feed(self._piece(llm, token))
                out.add(text, token)
                if decoder.stopped:
                    finish = "stop"
                    break
                if generated >= max_new:
                    break
            out.add(decoder.finish())
            out.flush()
            emit(Done(job_id=job.job_id, finish_reason=finish, prompt_tokens=len(tokens),
                      completion_tokens=generated))
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop to raise
            emit(exc)

    def _green_list(self, llm: llama_cpp.Llama, job: Generate) -> GreenList | None:
        """The watermark bias of ``job`` (None when it asks for none).

        Raises:
            BackendError: the job asks for a watermark and the coordinator gave this miner
                no key (``invalid_value``, param ``watermark``).
        """
        if not job.params.watermark:
            return None
        if self.watermark_key is None:
            raise BackendError("invalid_value", "This miner cannot watermark: its coordinator "
                               "sent no watermark key.", "watermark")
        return green_list(self.watermark_key, llm.n_vocab())

    def tokenize(self, text: str) -> list[int]:
        if self.offer.private:
            raise BackendError("tokenize_unsupported", "a private model's file has no "
                               "vocabulary to tokenize text with", "model")
        # llama.cpp's tokenizer only reads the vocabulary: safe beside a running slot
        return self._slots[0].llm.tokenize(text.encode(), add_bos=False, special=False)

    def _decoder(self, job: Generate) -> StreamDecoder:
        """The job's text decoder. A private model's miner sees no text, so the client
        applies stop strings (:class:`covey.client.private.PrivateDecoder`), not the miner."""
        return StreamDecoder(() if self._private else job.params.stop)

    def _end_tokens(self, llm: llama_cpp.Llama) -> np.ndarray:
        """Ids of every end-of-generation token of the vocabulary (cached; none for a
        private model, whose file cannot name them: its jobs carry ``stop_ids``)."""
        if self._eog is None:
            vocab = llm._model.vocab
            self._eog = np.array([t for t in range(llm.n_vocab())
                                  if llama_cpp.llama_vocab_is_eog(vocab, t)], dtype=np.int64)
        return self._eog

    def _check(self, llm: llama_cpp.Llama, check: Check, cancel: threading.Event
               ) -> CheckReport:
        """The validator's side of a re-check, on the slot's own thread."""
        job, ids = check.job, list(check.token_ids)
        tokens = self.tokenize_job(llm, job)
        decoder = self._decoder(job)
        text = "".join(decoder.feed(self._piece(llm, t)) for t in ids) + decoder.finish()
        eos = check.finish_reason == "stop" and not decoder.stopped
        forced = ids if eos else ids[:-1]
        if not tokens or len(tokens) + len(forced) > llm.n_ctx():
            raise BackendError("context_length_exceeded",
                               "the prompt and answer do not fit this validator's context")
        if not prefill(llm, tokens, [], cancel, lambda n: None):
            raise BackendError("cancelled", "the check was cancelled")
        rows = [last_logits(llm, 1)]
        for i in range(0, len(forced), PREFILL_CHUNK):
            if cancel.is_set():
                raise BackendError("cancelled", "the check was cancelled")
            rows.append(eval_logits(llm, forced[i: i + PREFILL_CHUNK]))
        logits = np.vstack(rows)
        marker = self._green_list(llm, job)
        if marker is not None:  # the miner sampled from biased logits: score against those
            # row i was sampled after the token before target i (the last prompt token first)
            logits = marker.bias_rows(logits, np.asarray([tokens[-1], *ids][: len(logits)]))
        targets = list(ids)
        if eos:  # the most likely end token after the answer stands for "stop here"
            # the job's stop ids end an answer too (they are the only ends a private
            # model has)
            stops = [t for t in job.stop_ids if t < llm.n_vocab()]
            ends = np.union1d(self._end_tokens(llm), np.asarray(stops, dtype=np.int64))
            if not len(ends):
                raise BackendError("invalid_value", "the answer claims to have stopped, but "
                                   "the model has no end-of-generation token and the job no "
                                   "stop_ids", "stop_ids")
            targets.append(int(ends[np.argmax(logits[-1, ends])]))
        p = job.params
        stats = token_stats(logits, np.asarray(targets, dtype=np.int64), p.temperature,
                            p.top_p, check.tail_q)
        return CheckReport(job_id=check.job_id, prompt_tokens=len(tokens),
                           text_matches=text == check.text, gaps=stats.gaps,
                           outside=stats.outside, tail_count=stats.tail_count,
                           tail_mass=stats.tail_mass, logq_sum=stats.logq_sum,
                           entropy_sum=stats.entropy_sum,
                           variance_sum=max(stats.variance_sum, 0.0),
                           chernoff=stats.chernoff, eos_checked=eos)

    async def check(self, check: Check) -> CheckReport:
        asked = time.monotonic()
        slot = await self._free.get()
        waited = time.monotonic() - asked
        if waited > 5:
            log.warning("check %s waited %.1f s for a free slot", check.job_id, waited)
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(
            slot.executor, self._check, slot.llm, check, cancel)
        future.add_done_callback(lambda _f: self._free.put_nowait(slot))
        try:
            return await asyncio.shield(future)
        finally:
            cancel.set()

    async def generate(self, job: Generate) -> AsyncIterator[Started | Progress | Delta | Done]:
        slot = await self._free.get()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        future = loop.run_in_executor(slot.executor, self._run, slot.llm, job, emit, cancel)
        # The slot is free only when its thread has stopped touching the context.
        future.add_done_callback(lambda _f: self._free.put_nowait(slot))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Started | Progress | Delta | Done)
                yield item
                if isinstance(item, Done):
                    return
        finally:
            cancel.set()


def _vocabulary_less(llm: llama_cpp.Llama) -> bool:
    """Whether the GGUF has no vocabulary (``tokenizer.ggml.model = "none"``, loaded as
    llama.cpp's ``LLAMA_VOCAB_TYPE_NONE`` with dummy tokens): a private model made by
    ``covey model private``, which also marks it ``covey.private = true``."""
    return (llama_cpp.llama_vocab_type(llm._model.vocab) == llama_cpp.LLAMA_VOCAB_TYPE_NONE
            or llm.metadata.get("covey.private") == "true")


def _chat_formatter(llm: llama_cpp.Llama) -> Jinja2ChatFormatter | None:
    """The GGUF's own chat template (``tokenizer.chat_template``), or None if it has none."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    eos, bos = llm.token_eos(), llm.token_bos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )
