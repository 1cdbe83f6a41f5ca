"""Miner ⇄ coordinator frames: a closed union of small frozen pydantic models.

One WebSocket per miner carries JSON objects, each with a ``type`` field naming its class.
The handshake is ``challenge`` (coordinator) → ``hello`` (miner, signed) → ``welcome``.
A task (:data:`Task`) is answered by its own reply frames: a generation is ``generate`` →
``started`` → ``progress``* → ``delta``* → ``done`` | ``error``, an embedding ``embed`` →
``embedded`` | ``error``, media tasks as :mod:`covey.protocol.audio` and
:mod:`covey.protocol.image` say; ``cancel`` from the coordinator stops any; a re-check is
``check`` → ``check_report`` | ``error``; ``heartbeat`` flows both ways. Watermark
detection asks a miner for token ids: ``tokenize`` → ``tokens`` | ``error``.

Sealed (end-to-end encrypted) jobs use the same frames: the job's content travels in
``Generate.sealed``, the answer in ``Delta.sealed`` (see :mod:`covey.protocol.sealing`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, TypeAdapter

from covey.protocol.audio import (
    AudioChunk,
    Segment,
    Speak,
    SpeechChunk,
    Spoken,
    Transcribe,
    Transcribed,
)
from covey.protocol.embed import Embed, Embedded
from covey.protocol.image import Paint, Painted
from covey.protocol.score import KeyChunk, Score, Scored, ScoringCard
from covey.protocol.wire import (
    Base64,
    JobId,
    MinerId,
    Receipt,
    Sha256Hex,
    ShardRange,
    TokenId,
    _Frame,
)

__all__ = ["AudioChunk", "Base64", "Embed", "Embedded", "JobId", "KeyChunk", "MinerId", "Paint",
           "Painted", "Receipt", "Score", "Scored", "ScoringCard", "Segment", "Sha256Hex",
           "ShardRange", "Speak", "SpeechChunk", "Spoken", "TokenId", "Transcribe", "Transcribed"]

PROTOCOL_VERSION = 7

class Hardware(_Frame):
    """What the miner runs on: logical CPUs, RAM in bytes, GPU names (empty when none)."""

    cpu_count: int = Field(ge=1, le=2**20)
    ram_bytes: int = Field(ge=0, le=2**60)
    gpus: tuple[Annotated[str, Field(max_length=200)], ...] = Field(default=(), max_length=64)


ModelKind = Literal["chat", "embedding", "transcription", "speech", "image", "scoring"]
"""The kinds of model a miner can serve; ``GET /v1/models`` shows each model's."""


class ModelOffer(_Frame):
    """One model a miner serves.

    ``sha256`` is the SHA-256 of the weights file, ``context_length`` is in tokens;
    ``ask_prompt`` / ``ask_completion`` are the miner's asking prices in µcr per 1M tokens
    (the network's floor price applies when they are lower).
    """

    name: str = Field(min_length=1, max_length=200)
    sha256: Sha256Hex
    context_length: int = Field(ge=1, le=2**24)
    backend: str = Field(min_length=1, max_length=50)
    ask_prompt: int = Field(default=0, ge=0, le=10**15)
    ask_completion: int = Field(default=0, ge=0, le=10**15)
    kind: ModelKind = "chat"
    """What the model does, hence which tasks it takes: ``chat`` (:class:`Generate`),
    ``embedding`` (:class:`~covey.protocol.embed.Embed`), ``transcription``
    (:class:`~covey.protocol.audio.Transcribe`), ``speech``
    (:class:`~covey.protocol.audio.Speak`), ``image`` (:class:`~covey.protocol.image.Paint`)
    or ``scoring`` (:class:`~covey.protocol.score.Score`). Prices are per 1M of the kind's
    unit: tokens, seconds of audio, characters, 256-pixel image tiles, or scored rows (a
    scoring model's ``ask_completion`` prices its milliseconds of proving or encrypted work)."""
    slots: int | None = Field(default=None, ge=1, le=1024)
    """Tasks of this model the miner runs at once (None: the hello's ``slots``)."""
    dimensions: int | None = Field(default=None, ge=1, le=2**16)
    """An embedding model's vector length (None for other kinds)."""
    voices: tuple[Annotated[str, Field(max_length=100)], ...] = Field(default=(),
                                                                      max_length=256)
    """A speech model's voices (empty for other kinds)."""
    sizes: tuple[Annotated[str, Field(pattern=r"^[0-9]{1,4}x[0-9]{1,4}$")], ...] = Field(
        default=(), max_length=64)
    """An image model's sizes, ``WIDTHxHEIGHT`` in pixels, the default first (empty for
    other kinds)."""
    card: ScoringCard | None = None
    """A scoring model's card: its features in order, its output, its training data and
    accuracy (None for other kinds)."""
    proof_vk: Sha256Hex | None = None
    """A scoring model the miner proves answers of: the SHA-256 of the verifying key its
    proving key belongs to (None: no proofs)."""
    shard: ShardRange | None = None
    """A sharded model's block range this miner holds (None: the whole model). A shard
    takes :class:`~covey.protocol.shard.Forward` tasks only; the coordinator chains
    shards that together cover the model (:mod:`covey.protocol.shard`)."""
    rebalance: bool = False
    """A shard miner that lets the coordinator move it to another block range of the same
    size (:class:`Reshard`) when blocks of the model have no miner."""
    private: bool = False
    """A private (permuted-vocabulary) model: the file holds no vocabulary, so jobs must
    carry ``prompt_ids`` and the answer is token ids only (``covey model private``)."""


class Challenge(_Frame):
    """First frame from the coordinator: a random nonce (hex) the miner must sign."""

    type: Literal["challenge"] = "challenge"
    nonce: str = Field(pattern=r"^[0-9a-f]{64}$")
    protocol_version: int = PROTOCOL_VERSION


class Hello(_Frame):
    """The miner's answer to a challenge.

    ``signature`` is the hex Ed25519 signature by ``public_key`` over
    :func:`covey.protocol.signing.hello_digest` of every other field plus the nonce.
    ``slots`` is how many jobs the miner runs at once.
    """

    type: Literal["hello"] = "hello"
    protocol_version: int = PROTOCOL_VERSION
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    nonce: str = Field(pattern=r"^[0-9a-f]{64}$")
    hardware: Hardware
    models: tuple[ModelOffer, ...] = Field(min_length=1, max_length=64)
    slots: int = Field(ge=1, le=1024)
    version: str = Field(max_length=50)
    box_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """The miner's X25519 public key (hex) that clients seal end-to-end encrypted jobs to."""
    box_signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")
    """The miner's Ed25519 signature of ``box_key``
    (:func:`covey.protocol.sealing.sign_box_key`), which a client checks itself."""
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


class Welcome(_Frame):
    """Coordinator accepted the hello; ``heartbeat_interval`` is in seconds."""

    type: Literal["welcome"] = "welcome"
    miner_id: MinerId
    heartbeat_interval: float
    watermark_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """The network's watermark key (hex, 32 bytes): the miner biases sampling with it when a
    job asks for a watermark (:mod:`covey.protocol.watermark`)."""


class Heartbeat(_Frame):
    """Liveness ping, both directions; ``active`` is the sender's running jobs (miner side)."""

    type: Literal["heartbeat"] = "heartbeat"
    active: int = 0


class SamplingParams(_Frame):
    """Decoding settings, with OpenAI's meanings.

    ``max_tokens`` is the cap on generated tokens (None: up to the context length);
    ``temperature`` 0 means greedy; ``stop`` holds at most 4 strings.
    """

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = Field(default=(), max_length=4)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    watermark: bool = False
    """Bias sampling towards the green list of the network's watermark key
    (:mod:`covey.protocol.watermark`; Kirchenbauer et al., 2023)."""


class ChatMessage(_Frame):
    """A chat turn already flattened to text."""

    role: str
    content: str


class Resume(_Frame):
    """Where a failed-over job picks up: the ``token_ids`` another miner already generated
    and the client already received, and ``text_chars``, the characters of text the client
    already received (code points).

    The new miner evaluates prompt + ``token_ids`` in the same schedule the first miner did
    (the prompt in canonical batches, then the generated tokens one at a time), so greedy
    decoding continues exactly where it stopped, and it sends only text past ``text_chars``:
    text that was held back (a split UTF-8 character, a possible stop-string start) is sent
    once, never twice. Re-tokenizing the delivered text instead could give other ids and
    another continuation.
    """

    token_ids: tuple[int, ...] = Field(max_length=2**24)
    text_chars: int = Field(ge=0)


class Generate(_Frame):
    """Task: run one text generation (chat or completion); usage in prompt and completion
    tokens, answered by ``started`` → ``progress``* → ``delta``* → ``done`` | ``error``.
    Exactly one of ``messages`` (chat), ``prompt`` (completion), ``prompt_ids`` (token ids,
    chat template already applied: private models) or ``sealed`` is set.

    ``model_sha256`` pins the weights the job must run on; ``resume`` is set when the job
    continues one that failed on another miner (``params.max_tokens`` still counts from the
    start, the resumed tokens included). ``stop_ids`` end the answer like the model's own
    end-of-generation tokens (a private model's file cannot name them).

    ``sealed`` is an end-to-end encrypted job (:func:`covey.protocol.sealing.seal_job`):
    base64 of the client's ephemeral X25519 key and a box only the chosen miner can open,
    holding the job's content (messages, prompt or prompt ids, sampling settings, resume
    point, stop strings: :class:`~covey.protocol.sealing.SealedContent`). The coordinator
    sees ``model``, ``model_sha256``, ``params`` (sampling settings: it sizes the escrow by
    ``max_tokens`` and judges re-checks by ``temperature`` and ``top_p``; ``params.stop``
    is empty, stop strings travel inside) and ``prompt_bound``.
    """

    type: Literal["generate"] = "generate"
    job_id: JobId
    model: str
    model_sha256: Sha256Hex | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    prompt_ids: tuple[TokenId, ...] | None = Field(default=None, max_length=2**24)
    stop_ids: tuple[TokenId, ...] = Field(default=(), max_length=64)
    params: SamplingParams = SamplingParams()
    resume: Resume | None = None
    sealed: Base64 | None = None
    prompt_bound: int | None = Field(default=None, ge=1)
    """For a sealed job: the most prompt tokens the escrow was sized for (the coordinator
    cannot count them); the miner refuses a longer prompt."""
    resume_tokens: int = Field(default=0, ge=0)
    """For a sealed job: the answer tokens earlier miners delivered (the coordinator counts
    them); the miner refuses a box whose resume point holds any other number, so a client
    cannot pass a prompt off as a free resume or make an honest miner look like it stopped
    early."""


class Started(_Frame):
    """The prompt fits the context and prefill begins; ``prompt_tokens`` is its length."""

    type: Literal["started"] = "started"
    job_id: JobId
    prompt_tokens: int = Field(ge=0)


class Progress(_Frame):
    """Prefill is under way: ``prefilled`` of the prompt's tokens are evaluated so far.

    Sent between prefill chunks so the coordinator can tell a long prompt from a stalled miner.
    """

    type: Literal["progress"] = "progress"
    job_id: JobId
    prefilled: int = Field(ge=0)


class Delta(_Frame):
    """New output: ``token_ids`` generated since the last delta and the text they complete.

    ``text`` may lag ``token_ids``: bytes of a multi-byte character split across tokens, or a
    possible start of a stop string, are held back until they resolve.

    For a sealed job ``text`` is empty, ``token_ids`` too, and ``sealed`` holds both,
    encrypted under the job's session key (:func:`covey.protocol.sealing.seal_delta`);
    ``sealed_tokens`` says how many token ids it holds (usage is public, content is not).
    """

    type: Literal["delta"] = "delta"
    job_id: JobId
    text: str
    token_ids: tuple[int, ...]
    sealed: Base64 | None = None
    sealed_tokens: int = Field(default=0, ge=0)

    @property
    def tokens(self) -> int:
        """Token ids this delta carries, sealed or not."""
        return self.sealed_tokens if self.sealed is not None else len(self.token_ids)


class Done(_Frame):
    """Generation ended; ``finish_reason`` is OpenAI's ("stop" or "length"); usage in tokens.

    ``completion_tokens`` counts the tokens this miner generated, not those it resumed from.
    ``receipt`` is the miner's account of the job and ``signature`` its hex Ed25519
    signature (:mod:`covey.protocol.receipts`); the agent adds both.
    """

    type: Literal["done"] = "done"
    job_id: JobId
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    receipt: Receipt | None = None
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


class JobError(_Frame):
    """The job failed; ``code`` is OpenAI-style, e.g. ``context_length_exceeded``."""

    type: Literal["error"] = "error"
    job_id: JobId
    code: str = Field(pattern=r"^[a-z0-9_]{1,64}$")
    message: str = Field(max_length=2000)
    param: str | None = Field(default=None, max_length=200)


class Cancel(_Frame):
    """Coordinator asks the miner to stop a job (the client went away)."""

    type: Literal["cancel"] = "cancel"
    job_id: JobId


class Check(_Frame):
    """Ask a validator to re-check another miner's answer to ``job``.

    ``job_id`` is the check's own id (replies carry it); ``job`` is the request as the miner
    got it; ``token_ids`` / ``text`` / ``finish_reason`` are what the miner streamed and
    reported. The validator runs one teacher-forced prefill over prompt + ``token_ids`` with
    the same weights (``job.model_sha256``) and reports how each token fits its own
    distribution (:class:`CheckReport`); it does not learn whose answer it checks.
    """

    type: Literal["check"] = "check"
    job_id: JobId
    job: Generate
    token_ids: tuple[int, ...] = Field(max_length=2**24)
    text: str
    finish_reason: Literal["stop", "length"]
    tail_q: float = Field(default=1e-4, gt=0.0, lt=1.0)
    sealed_key: Base64 | None = None
    """For a sealed job: the job's session key, sealed by the client to this validator
    (:func:`covey.protocol.sealing.seal_key`). ``job.sealed`` is then the box the miner got
    and ``stream`` the miner's sealed deltas; ``token_ids`` and ``text`` are empty and the
    validator decrypts both itself, so neither the coordinator nor the client can show it
    anything but what the miner received and sent."""
    stream: tuple[Base64, ...] = Field(default=(), max_length=2**20)


class CheckReport(_Frame):
    """A validator's measurements of one answer (the coordinator judges them).

    - ``prompt_tokens``: the prompt's length by the validator's own tokenizer.
    - ``text_matches``: the token ids decode (through the same stop-string handling) to
      exactly the streamed text.
    - ``gaps``: per output token, the validator's top logit minus the token's logit (≥ 0;
      0 where the token is its argmax), in raw logits.
    - ``outside``: tokens outside the set the request's sampler could pick from (the
      top-p set; llama.cpp's order: top-p on the untempered distribution, then temperature);
      only for sampled requests (temperature > 0), else 0.
    - ``tail_count`` / ``tail_mass``: of the tokens inside that set, how many had a
      probability q below ``Check.tail_q`` under the sampler's renormalized, tempered
      distribution, and the sum over positions of the probability of landing there (the
      count an honest sampler is expected to reach). The coordinator's Poisson tail test
      compares the two. Zero for greedy requests.
    - ``logq_sum`` / ``entropy_sum`` / ``variance_sum``: over the same tokens, the sum of
      log q(token), of the entropy H(q) and of Var[log q] (nats): an honest sampler's
      ``logq_sum`` has mean −``entropy_sum`` and variance ``variance_sum`` (the coordinator
      records the z-score as evidence). Zero for greedy requests.
    - ``chernoff``: for λ in (0.25, 0.5, 0.75, 0.9), the sum over the same positions of
      log Σ_j q_j^(1−λ); an honest answer's ``logq_sum`` is that low with probability at
      most min_λ exp(chernoff_λ + λ·logq_sum) (Chernoff's bound). Empty for greedy requests.
    - ``eos_checked``: the answer ended with ``stop`` but not on a stop string, so the
      validator also scored the end-of-generation token after the last token; it is the last
      entry of ``gaps`` (and counted in ``outside`` / ``tail_count``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    type: Literal["check_report"] = "check_report"
    job_id: JobId
    prompt_tokens: int = Field(ge=0)
    text_matches: bool
    gaps: tuple[float, ...] = Field(max_length=2**24)
    outside: int = Field(ge=0)
    tail_count: int = Field(default=0, ge=0)
    tail_mass: float = Field(default=0.0, ge=0.0)
    logq_sum: float = 0.0
    entropy_sum: float = Field(default=0.0, ge=0.0)
    variance_sum: float = Field(default=0.0, ge=0.0)
    chernoff: tuple[float, ...] = Field(default=(), max_length=4)
    eos_checked: bool = False


class Reshard(_Frame):
    """Coordinator → a shard miner that offered ``rebalance``: load blocks ``start:end`` of
    ``model`` instead of the range it holds (no live miner holds them), then connect again
    with a new ``hello``. Petals' servers move the same way to the blocks the swarm lacks."""

    type: Literal["reshard"] = "reshard"
    model: str = Field(min_length=1, max_length=200)
    start: int = Field(ge=0, lt=2**16)
    end: int = Field(ge=1, le=2**16)


class Tokenize(_Frame):
    """Ask a miner for the token ids of ``text`` under ``model``'s tokenizer (no special
    tokens, no template): watermark detection scores token ids."""

    type: Literal["tokenize"] = "tokenize"
    job_id: JobId
    model: str
    text: str = Field(max_length=2**20)


class Tokens(_Frame):
    """The answer to ``tokenize``."""

    type: Literal["tokens"] = "tokens"
    job_id: JobId
    token_ids: tuple[TokenId, ...] = Field(max_length=2**20)


Job = Generate
"""The older name of :class:`Generate`."""

Task = Annotated[Generate | Embed | Transcribe | Speak | Paint | Score,
                 Field(discriminator="type")]
"""A unit of work for a miner, one class per kind (DESIGN.md, Tasks). Verification tasks
(:class:`Check`) and :class:`Tokenize` travel the same way."""

Reply = (Started | Progress | Delta | Done | JobError | CheckReport | Tokens | Embedded
         | Segment | Transcribed | SpeechChunk | Spoken | Painted | Scored)
"""Frames a miner sends about a task; each carries the task's ``job_id``."""

Frame = Annotated[
    Challenge | Hello | Welcome | Heartbeat | Generate | Started | Progress | Delta | Done
    | JobError | Cancel | Check | CheckReport | Tokenize | Tokens | Embed | Embedded
    | Transcribe | AudioChunk | Segment | Transcribed | Speak | SpeechChunk | Spoken | Paint
    | Painted | Score | KeyChunk | Scored | Reshard,
    Field(discriminator="type"),
]

_FRAME_ADAPTER: TypeAdapter[Frame] = TypeAdapter(Frame)


def decode_frame(data: str | bytes) -> Frame:
    """Parse one JSON frame.

    Raises:
        pydantic.ValidationError: not JSON, an unknown ``type`` or a field out of range.
    """
    return _FRAME_ADAPTER.validate_json(data)


def encode_frame(frame: _Frame) -> str:
    """Serialize a frame to compact JSON text."""
    return frame.model_dump_json()
