"""Writing a private (permuted-vocabulary) copy of a GGUF model: ``covey model private``.

The copy computes exactly what the original does, on renamed token ids: row ``i`` of the
token embedding (and of the output projection, when the model does not tie it to the
embedding) moves to row ``perm[i]``, so feeding private id ``perm[i]`` looks up the vector of
real token ``i``, and the logit of private id ``perm[i]`` is the logit of real token ``i``.
Nothing else in a transformer depends on token ids, so greedy answers match token for token.

Quantized tensors are quantized row by row along ``n_embd`` (every GGML block type packs
blocks within one row), so moving whole rows of raw bytes is exact.

Every vocabulary string leaves the file: all ``tokenizer.*`` metadata (tokens, scores, token
types, merges, pre-tokenizer, chat templates, special-token ids, added tokens) is dropped and
``tokenizer.ggml.model`` is set to ``"none"`` with ``{arch}.vocab_size`` kept, which llama.cpp
loads as ``LLAMA_VOCAB_TYPE_NONE`` with that many dummy tokens (``llama-vocab.cpp``: "adding
N dummy tokens"). ``covey.private = true`` marks the file. Needs ``gguf`` (``pip install
'covey[llama]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PERMUTED_TENSORS", "PRIVATE_KEY", "PrivateFile", "write_private_gguf"]

PRIVATE_KEY = "covey.private"
"""Metadata key (bool) marking a private model."""
PERMUTED_TENSORS = ("token_embd.weight", "output.weight")
"""Tensors with one row per token (GGUF names, ``gguf.constants.TENSOR_NAMES``)."""


@dataclass(frozen=True)
class PrivateFile:
    """What :func:`write_private_gguf` did: the file, its vocabulary size, the tensors it
    permuted and the metadata keys it dropped."""

    path: Path
    n_vocab: int
    permuted: tuple[str, ...]
    dropped: tuple[str, ...]


def write_private_gguf(source: Path, target: Path, perm: Sequence[int]) -> PrivateFile:
    """Write the private copy of the GGUF at ``source`` to ``target`` (see module docstring).

    ``perm`` is :func:`covey.protocol.permutation.permutation` for the model's vocabulary
    size: ``perm[i]`` is the new id of token ``i``.

    Raises:
        ValueError: ``source`` is already private, has no ``token_embd.weight``, or ``perm``
            does not match its vocabulary size.
    """
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    if PRIVATE_KEY in reader.fields:
        raise ValueError(f"{source} is already a private model")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{source} has no token_embd.weight tensor")
    # The reader's array for a tensor of ne = [n_embd, n_vocab] has shape (n_vocab, row bytes
    # or n_embd): one row per token.
    n_vocab = int(tensors["token_embd.weight"].data.shape[0])
    if len(perm) != n_vocab:
        raise ValueError(f"the permutation has {len(perm)} ids but the model has "
                         f"{n_vocab} tokens")
    new_row_of = np.asarray(perm, dtype=np.int64)
    old_row_at = np.empty_like(new_row_of)
    old_row_at[new_row_of] = np.arange(n_vocab)  # new row perm[i] holds old row i

    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), arch, endianess=reader.endianess)
    if "general.alignment" in reader.fields:  # copied below; the writer must pad to it too
        writer.data_alignment = int(reader.fields["general.alignment"].contents())
    dropped = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by GGUFWriter itself
        if field.name.startswith("tokenizer.") or field.name == f"{arch}.vocab_size":
            dropped.append(field.name)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_key_value("tokenizer.ggml.model", "none", gguf.GGUFValueType.STRING)
    writer.add_key_value(f"{arch}.vocab_size", n_vocab, gguf.GGUFValueType.UINT32)
    writer.add_key_value(PRIVATE_KEY, True, gguf.GGUFValueType.BOOL)

    permuted = tuple(name for name in PERMUTED_TENSORS if name in tensors)
    for name in permuted:
        if tensors[name].data.shape[0] != n_vocab:
            raise ValueError(f"{name} has {tensors[name].data.shape[0]} rows, not {n_vocab}")

    def data(tensor: gguf.ReaderTensor) -> np.ndarray:
        if tensor.name in permuted:
            return np.ascontiguousarray(tensor.data[old_row_at])
        return tensor.data

    # Header and tensor infos first, then the data one tensor at a time (as gguf's own
    # gguf_new_metadata.py does), so only one permuted tensor is in memory at once.
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype,
                               tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(data(tensor), tensor_endianess=reader.endianess)
    writer.close()
    return PrivateFile(target, n_vocab, permuted, tuple(dropped))
