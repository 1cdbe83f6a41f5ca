"""The rules every text generation obeys, whatever backend runs it.

A backend tokenizes the prompt its own way, then asks :func:`admit` whether the job may run
and how many tokens it may still generate; it builds its stop-string decoder with
:func:`decoder_for`. So an empty prompt, a prompt over the context, a resume point that
cannot come from this model, token ids outside its vocabulary and text sent to a private
model are refused alike by llama.cpp, the synthetic backend and any backend to come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from covey.miner.backends.base import BackendError
from covey.protocol import Generate
from covey.protocol.text import StreamDecoder


def prompt_param(job: Generate) -> str:
    """The request field the prompt came in: ``prompt_ids``, ``messages`` or ``prompt``."""
    return ("prompt_ids" if job.prompt_ids is not None
            else "messages" if job.messages is not None else "prompt")


def check_ids(ids: Iterable[int], n_vocab: int, param: str, what: str) -> None:
    """Refuse a token id outside the vocabulary (llama.cpp would fail with an opaque error).

    Raises:
        BackendError: ``invalid_value`` naming ``param``.
    """
    bad = next((t for t in ids if t >= n_vocab), None)
    if bad is not None:
        raise BackendError("invalid_value", f"{what} holds token id {bad}, outside this "
                           f"model's vocabulary of {n_vocab}.", param)


def refuse_text(job: Generate, model: str) -> None:
    """A private model's miner takes token ids only (its file holds no vocabulary).

    Raises:
        BackendError: ``invalid_value`` naming the text field, when the job carries text.
    """
    if job.prompt_ids is None:
        raise BackendError("invalid_value", f"{model} is a private model: send token ids "
                           "(prompt_ids) made with its key, not text", prompt_param(job))


def admit(job: Generate, prompt_tokens: int, n_ctx: int, n_vocab: int) -> int:
    """Check ``job`` (its prompt tokenized to ``prompt_tokens`` tokens) against a model of
    ``n_ctx`` tokens of context and ``n_vocab`` tokens of vocabulary, before ``started``.
    Returns how many tokens it may still generate: ``max_tokens`` less the resumed ones,
    within the context left after the prompt and the resumed answer.

    Raises:
        BackendError: ``invalid_prompt`` for an empty prompt; ``context_length_exceeded``
            for a prompt (or prompt and resumed answer) that fills the context;
            ``invalid_value`` for a resume point with ids outside the vocabulary or more
            tokens than ``max_tokens``.
    """
    param = prompt_param(job)
    if prompt_tokens == 0 or job.prompt == "" or job.prompt_ids == ():
        raise BackendError("invalid_prompt", f"The {param} is empty.", param)
    if prompt_tokens >= n_ctx:
        raise BackendError(
            "context_length_exceeded",
            f"This model's maximum context length is {n_ctx} tokens. However, your "
            f"{param} resulted in {prompt_tokens} tokens. Please reduce the length.", param)
    resumed = job.resume.token_ids if job.resume else ()
    check_ids(resumed, n_vocab, "resume", "The resume point")
    cap = job.params.max_tokens
    if cap is not None and len(resumed) > cap:
        raise BackendError("invalid_value", f"The resume point holds {len(resumed)} tokens, "
                           f"more than max_tokens ({cap}).", "resume")
    if prompt_tokens + len(resumed) >= n_ctx:
        raise BackendError("context_length_exceeded", f"The prompt ({prompt_tokens} tokens) "
                           f"and the resumed answer ({len(resumed)}) fill the {n_ctx}-token "
                           "context.", "resume")
    budget = n_ctx - prompt_tokens - len(resumed)
    return min(cap - len(resumed), budget) if cap else budget


def decoder_for(job: Generate, piece: Callable[[int], bytes], private: bool = False
                ) -> StreamDecoder:
    """The job's stop-string decoder, past its resume point when it has one (the text the
    client already has is replayed, never sent again). A ``private`` model's miner sees no
    text: the client applies the stop strings (:class:`covey.client.private.PrivateDecoder`).
    """
    decoder = StreamDecoder(() if private else job.params.stop)
    if job.resume:
        resumed: Sequence[int] = job.resume.token_ids
        decoder.replay((piece(t) for t in resumed), job.resume.text_chars)
    return decoder
