"""The client's side of a private model: the real tokenizer and the secret permutation.

A private model (``covey model private``) is served by miners from a file with no vocabulary
and permuted embedding rows. The client keeps the plain GGUF (only its vocabulary is read)
and the key, and does everything a miner would do with text:

    >>> pm = PrivateModel(key, Path("SmolLM2-135M-Instruct.Q4_1.gguf"))
    >>> job_ids = pm.chat_ids([{"role": "user", "content": "Hi"}])   # → Generate.prompt_ids
    >>> stop = pm.stop_ids                                             # → Generate.stop_ids
    >>> dec = pm.decoder(stop=["\\n\\n"])
    >>> text = "".join(dec.feed(delta.token_ids) for delta in deltas) + dec.finish()

Prompts are built exactly as :class:`covey.miner.backends.llama_cpp.LlamaCppBackend` builds
them for text jobs (the GGUF's chat template, then tokenizing with special tokens), so a
private model answers a request token for token as the plain model would. Stop strings are
applied here, by :class:`PrivateDecoder` (the miner cannot see text): send them to the
decoder, not in the job, and cancel the request once :attr:`PrivateDecoder.stopped`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from covey.protocol.permutation import inverse, load_key, permutation
from covey.protocol.text import StreamDecoder

__all__ = ["PrivateDecoder", "PrivateModel"]


class PrivateModel:
    """The plain model's tokenizer plus the permutation of ``key`` (32 bytes).

    ``plain_gguf`` is the original (non-private) GGUF the private file was made from; only
    its vocabulary and metadata are loaded (``vocab_only``: ~0.1 s, a few MB). Attributes:
    ``n_vocab`` (tokens), ``stop_ids`` (the private ids of the plain model's
    end-of-generation tokens, for ``Generate.stop_ids``). Safe to share between asyncio tasks;
    each call is short CPU work. Call :meth:`close` (or use ``with``) when done.

    Raises (from the constructor):
        ValueError: llama.cpp cannot load ``plain_gguf``, or ``key`` is not 32 bytes.
    """

    def __init__(self, key: bytes, plain_gguf: Path) -> None:
        self._llm = llama_cpp.Llama(model_path=str(plain_gguf), vocab_only=True,
                                    verbose=False)
        self.n_vocab: int = self._llm.n_vocab()
        self._perm = permutation(key, self.n_vocab)
        self._inv = inverse(self._perm)
        vocab = self._llm._model.vocab
        ends = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        self.stop_ids: tuple[int, ...] = tuple(self._perm[t] for t in ends)
        self._formatter = _chat_formatter(self._llm)
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def from_key_file(cls, key_file: Path, plain_gguf: Path) -> PrivateModel:
        """Load the key from ``key_file`` (see :func:`covey.protocol.permutation.load_key`).

        Raises:
            covey.protocol.permutation.KeyFileError: missing, malformed or not private.
            ValueError: as the constructor.
        """
        return cls(load_key(key_file), plain_gguf)

    def close(self) -> None:
        """Free the tokenizer."""
        self._llm.close()

    def __enter__(self) -> PrivateModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Private prompt ids of a chat: ``messages`` are ``{"role": …, "content": str}``
        dicts, formatted by the plain GGUF's chat template.

        Raises:
            ValueError: the model has no chat template, or the template rejects the messages.
        """
        if self._formatter is None:
            raise ValueError("this model has no chat template; use prompt_ids()")
        try:
            prompt = self._formatter(messages=[{"role": m["role"], "content": m["content"]}
                                               for m in messages]).prompt
        except Exception as exc:  # jinja2 raise_exception → ValueError, or a TemplateError
            raise ValueError(f"chat template: {exc}") from exc
        return self.map(self._llm.tokenize(prompt.encode(), add_bos=False, special=True))

    def prompt_ids(self, text: str) -> list[int]:
        """Private prompt ids of a completion prompt (BOS added if the model wants one)."""
        return self.map(self._llm.tokenize(text.encode(), add_bos=True, special=True))

    def map(self, ids: Iterable[int]) -> list[int]:
        """Real token ids → private ids.

        Raises:
            IndexError: an id outside ``[0, n_vocab)``.
        """
        return [self._perm[_checked(t, self.n_vocab)] for t in ids]

    def unmap(self, ids: Iterable[int]) -> list[int]:
        """Private token ids (as a miner streams them) → real ids.

        Raises:
            IndexError: an id outside ``[0, n_vocab)``.
        """
        return [self._inv[_checked(t, self.n_vocab)] for t in ids]

    def piece(self, real_id: int) -> bytes:
        """The bytes of real token ``real_id`` (empty for control tokens), as a miner
        detokenizes it for a plain model."""
        piece = self._pieces.get(real_id)
        if piece is None:
            piece = self._pieces[real_id] = self._llm.detokenize([real_id])
        return piece

    def decoder(self, stop: Sequence[str] = ()) -> PrivateDecoder:
        """A fresh incremental decoder for one answer, honouring ``stop`` strings."""
        return PrivateDecoder(self, stop)


class PrivateDecoder:
    """Turns the private ids a miner streams back into text, incrementally.

    ``feed(ids)`` returns the text now safe to show (a UTF-8 character split across tokens,
    or a possible start of a stop string, is held back, as a miner does for plain models);
    ``stopped`` turns true at a stop string or one of the model's ``stop_ids`` (nothing after
    it is returned); ``finish()`` returns what is still held back at the end.

    Raises (from ``feed``):
        IndexError: an id outside the vocabulary.
    """

    def __init__(self, model: PrivateModel, stop: Sequence[str] = ()) -> None:
        self._model = model
        self._text = StreamDecoder(stop)
        self._ends = frozenset(model.stop_ids)

    @property
    def stopped(self) -> bool:
        """A stop string or end-of-generation token was seen."""
        return self._text.stopped

    def feed(self, ids: Iterable[int]) -> str:
        """Add private token ids; return newly emittable text (may be empty)."""
        out = []
        for t in ids:
            if self._text.stopped:
                break
            if t in self._ends:  # a miner stops before sending these; be safe if one does
                out.append(self._text.finish())
                self._text.stopped = True
                break
            out.append(self._text.feed(self._model.piece(self._model.unmap([t])[0])))
        return "".join(out)

    def finish(self) -> str:
        """Text still held back at the end of the answer."""
        return self._text.finish()


def _checked(token: int, n: int) -> int:
    if not 0 <= token < n:
        raise IndexError(f"token id {token} is outside the vocabulary of {n} tokens")
    return token


def _chat_formatter(llm: llama_cpp.Llama) -> Jinja2ChatFormatter | None:
    """The GGUF's chat template, set up exactly as the miner's
    ``covey.miner.backends.llama_cpp._chat_formatter`` does (the client may not import the
    miner; ``tests/test_private.py`` checks both give the same prompt ids)."""
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
