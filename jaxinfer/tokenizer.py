"""Tokenizers: one interface over SentencePiece and Hugging Face ``tokenizers``.

Two back ends, chosen by the vocabulary, never by a flag:

* :class:`SentencePieceTokenizer` for SentencePiece vocabularies (Gemma, Llama 2): a
  ``tokenizer.model`` ModelProto, loaded from disk or built from GGUF metadata.
* :class:`HFTokenizer` for byte-level BPE (Llama 3, SmolLM2, Qwen) and anything else that
  comes as a ``tokenizer.json``.

Both are built from a GGUF file's metadata (:func:`from_gguf`) or from a Hugging Face
directory (:func:`from_hf_dir`); :meth:`Tokenizer.save` writes a directory that
:func:`load` (and ``transformers``) read back. Built from GGUF, both give the same ids as
``transformers``' own GGUF tokenizer (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``),
which ``tests/test_tokenizer.py`` checks on the real SmolLM2 and Gemma 3 files.

:class:`IncrementalDetokenizer` turns a stream of generated ids into text deltas whose
concatenation is exactly ``decode(all_ids)`` and that never split a UTF-8 character.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path

import gguf
import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers

__all__ = [
    "CHAT_ROLES",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "empty_context_ids",
    "encode_chat",
    "from_gguf",
    "from_hf_dir",
    "load",
    "tokenize_context",
    "tokenize_continuation",
    "tokenize_pair",
]

# Roles a chat message may have; anything else is rejected before the template runs.
CHAT_ROLES = ("system", "user", "assistant", "tool")

# Tokens that close a chat turn; generation stops on them as on eos.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")

CONFIG_FILE = "tokenizer_config.json"
SP_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"

# GGUF token types (llama.cpp's llama_token_type), the same numbers as SentencePiece's.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer(abc.ABC):
    """Text <-> token ids, special tokens, BOS convention and chat template of one model."""

    def __init__(
        self,
        *,
        bos_id: int | None,
        eos_ids: Sequence[int],
        add_bos: bool,
        chat_template: str | None,
        special_ids: Iterable[int],
        pad_id: int | None = None,
    ) -> None:
        self.bos_id = bos_id
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.pad_id = pad_id
        self._special_ids = frozenset(int(i) for i in special_ids)
        if add_bos and bos_id is None:
            raise ValueError("add_bos is set but the vocabulary has no bos token")

    # -- back-end specific -------------------------------------------------------------

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    @abc.abstractmethod
    def id_to_piece(self, id: int) -> str: ...

    @abc.abstractmethod
    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece, or None if the vocabulary has no such piece."""

    @abc.abstractmethod
    def _added_tokens(self) -> dict[int, str]:
        """Tokens matched whole in text before the model runs (special and user-defined)."""

    @abc.abstractmethod
    def _save_model(self, directory: Path) -> None: ...

    # -- shared ------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_bos=None`` follows the model (:attr:`add_bos`)."""
        ids = self._encode_text(text)
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("this vocabulary has no bos token")
            ids.insert(0, self.bos_id)
        return ids

    def is_special(self, id: int) -> bool:
        """Control tokens (``<bos>``, ``<|im_end|>``...), which ``decode`` skips by default."""
        return int(id) in self._special_ids

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self.id_to_piece(self.eos_ids[0]) if self.eos_ids else None

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation with the model's chat template, as ``transformers`` does."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise ValueError(f"message {i} is not a mapping with a 'role': {message!r}")
            if message["role"] not in CHAT_ROLES:
                raise ValueError(
                    f"message {i} has unknown role {message['role']!r} (known roles: {', '.join(CHAT_ROLES)})"
                )
        return self._compiled_template.render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        return _chat_environment().from_string(self.chat_template)

    def save(self, directory: str | Path) -> None:
        """Write the vocabulary file and ``tokenizer_config.json`` (read back by :func:`load`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_model(directory)
        config = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": None if self.pad_id is None else self.id_to_piece(self.pad_id),
            "bos_token_id": self.bos_id,
            "eos_token_ids": list(self.eos_ids),
            "pad_token_id": self.pad_id,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "chat_template": self.chat_template,
            "added_tokens_decoder": {
                str(i): {
                    "content": content,
                    "special": i in self._special_ids,
                    "normalized": False,
                    "lstrip": False,
                    "rstrip": False,
                    "single_word": False,
                }
                for i, content in sorted(self._added_tokens().items())
            },
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, add_bos={self.add_bos})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; control and user-defined tokens in text are matched whole
    (longest match first), as ``transformers`` does with its added tokens."""

    def __init__(self, proto: sp_pb2.ModelProto, **kwargs) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        # Text after a control or user-defined token gets no dummy prefix (only the start
        # of the text does, as in transformers); a second processor encodes those pieces.
        self._sp_inner = self._sp
        if proto.normalizer_spec.add_dummy_prefix:
            inner = sp_pb2.ModelProto()
            inner.CopyFrom(proto)
            inner.normalizer_spec.add_dummy_prefix = False
            self._sp_inner = spm.SentencePieceProcessor(model_proto=inner.SerializeToString())
        types = [p.type for p in proto.pieces]
        kinds = (sp_pb2.ModelProto.SentencePiece.CONTROL, sp_pb2.ModelProto.SentencePiece.UNKNOWN)
        special = {i for i, t in enumerate(types) if t in kinds}
        added = {i for i, t in enumerate(types) if t == sp_pb2.ModelProto.SentencePiece.USER_DEFINED}
        self._added = {proto.pieces[i].piece: i for i in sorted(special | added)}
        self._added_re = _longest_match_regex(self._added)
        # SentencePiece drops the leading space of the first piece of a text in these cases.
        ns = proto.normalizer_spec
        self._strips_first_space = ns.add_dummy_prefix or ns.remove_extra_whitespaces
        super().__init__(special_ids=special | set(kwargs.pop("special_ids", ())), **kwargs)

    @property
    def proto(self) -> sp_pb2.ModelProto:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode_text(self, text: str) -> list[int]:
        if self._added_re is None:
            return self._sp.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._added_re.finditer(text):
            if m.start() > pos:
                ids.extend((self._sp if pos == 0 else self._sp_inner).encode(text[pos : m.start()]))
            ids.append(self._added[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend((self._sp if pos == 0 else self._sp_inner).encode(text[pos:]))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        # SentencePiece renders control tokens as "" and unk as " ⁇ "; like transformers,
        # we skip special tokens or spell them out, and decode the runs between them.
        parts: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self._special_ids:
                self._flush_run(run, parts)
                if not skip_special:
                    parts.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        self._flush_run(run, parts)
        return "".join(parts)

    def _flush_run(self, run: list[int], parts: list[str]) -> None:
        if not run:
            return
        text = self._sp.decode(run)
        if self._strips_first_space and any(parts) and self._sp.id_to_piece(run[0]).startswith("\u2581"):
            text = " " + text  # SentencePiece dropped it; only the start of the whole text loses it
        parts.append(text)
        run.clear()

    def id_to_piece(self, id: int) -> str:
        return self._sp.id_to_piece(int(id))

    def piece_to_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def _added_tokens(self) -> dict[int, str]:
        return {i: piece for piece, i in self._added.items()}

    def _save_model(self, directory: Path) -> None:
        (directory / SP_MODEL_FILE).write_bytes(self._proto.SerializeToString())


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (byte-level BPE and others)."""

    def __init__(self, backend: tokenizers.Tokenizer, **kwargs) -> None:
        self._tok = backend
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        super().__init__(special_ids=special | set(kwargs.pop("special_ids", ())), **kwargs)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode_text(self, text: str) -> list[int]:
        # BOS is ours to add (see Tokenizer.encode), not the post-processor's.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            # tokenizers skips only the tokens it knows as special; we also skip ours.
            ids = [i for i in ids if i not in self._special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, id: int) -> str:
        piece = self._tok.id_to_token(int(id))
        if piece is None:
            raise IndexError(f"token id {id} is out of range (vocab size {self.vocab_size})")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def _added_tokens(self) -> dict[int, str]:
        return {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}

    def _save_model(self, directory: Path) -> None:
        self._tok.save(str(directory / HF_TOKENIZER_FILE))


# ----------------------------------------------------------------------------------------
# GGUF


def from_gguf(reader: gguf.GGUFReader) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (``tokenizer.ggml.*``)."""
    meta = _GGUFMetadata(reader)
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("the GGUF file has no vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    architecture = meta.get("general.architecture", "")
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    # llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise; not to BPE.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")

    tokenizer: Tokenizer
    common = dict(
        bos_id=bos_id,
        eos_ids=(),
        add_bos=add_bos,
        chat_template=meta.get("tokenizer.chat_template"),
        pad_id=pad_id,
    )
    if kind == "llama":
        proto = _sentencepiece_proto(
            tokens,
            meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
            types,
            unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
            gemma=architecture.startswith("gemma"),
        )
        tokenizer = SentencePieceTokenizer(proto, **common)
    elif kind == "gpt2":
        backend = _byte_level_bpe(
            tokens,
            meta.get("tokenizer.ggml.merges") or [],
            types,
            meta.get("tokenizer.ggml.pre"),
        )
        tokenizer = HFTokenizer(backend, **common)
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}"
            " (supported: 'llama' = SentencePiece, 'gpt2' = byte-level BPE)"
        )
    eos = [eos_id, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
    tokenizer.eos_ids = _eos_ids(tokenizer, [i for i in eos if i is not None])
    return tokenizer


class _GGUFMetadata:
    def __init__(self, reader: gguf.GGUFReader) -> None:
        self._fields = reader.fields

    def get(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()


def _sentencepiece_proto(
    tokens: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    unk_id: int | None,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    add_dummy_prefix: bool,
    gemma: bool,
) -> sp_pb2.ModelProto:
    """A SentencePiece BPE ModelProto from GGUF's tokens, scores and token types.

    GGUF stores a token of two or more spaces with real spaces, SentencePiece (and
    transformers) spell it with U+2581; we respell it. For Gemma we follow transformers'
    GGUF converter (``gemma_tokenizer``): those whitespace tokens are ordinary BPE pieces
    and merge priority is the order of the vocabulary, so every score is ``-id`` (the file's
    scores of normal pieces already decrease with the id; its whitespace tokens have -1000).
    """
    Piece = sp_pb2.ModelProto.SentencePiece
    proto = sp_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = _BYTE in types
    trainer.split_digits = gemma
    trainer.split_by_whitespace = not gemma
    trainer.allow_whitespace_only_pieces = gemma
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    if unk_id is None:
        raise ValueError("a SentencePiece vocabulary needs an unknown token (tokenizer.ggml.unknown_token_id)")
    for name, value in (("unk", unk_id), ("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
        setattr(trainer, f"{name}_id", -1 if value is None else value)
        if value is not None:
            setattr(trainer, f"{name}_piece", tokens[value])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_dummy_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True

    type_of = {
        _NORMAL: Piece.NORMAL,
        _UNKNOWN: Piece.UNKNOWN,
        _CONTROL: Piece.CONTROL,
        _USER_DEFINED: Piece.USER_DEFINED,
        _UNUSED: Piece.UNUSED,
        _BYTE: Piece.BYTE,
    }
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        piece_type = type_of.get(kind, Piece.NORMAL)
        if token and " " in token and not token.strip(" "):
            token = "\u2581" * len(token)
            if gemma:
                piece_type = Piece.NORMAL
        if i == unk_id:
            piece_type = Piece.UNKNOWN  # GGUF files often mark <unk> as a control token
        elif piece_type == Piece.UNKNOWN:
            piece_type = Piece.CONTROL  # SentencePiece allows exactly one unknown piece
        proto.pieces.add(piece=token, score=-float(i) if gemma else float(score), type=piece_type)
    return proto


def _byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre: str | None
) -> tokenizers.Tokenizer:
    """Byte-level BPE as transformers' GGUF converter builds it (GPT2Tokenizer + split regex)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): i
        for i, token in enumerate(tokens)
    }
    model = tokenizers.models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    backend = tokenizers.Tokenizer(model)
    split = _PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        # GPT-2's own regex. llama.cpp's "smollm" also isolates every digit first; transformers
        # does not, and we follow transformers (see the parity tests).
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    # Control tokens become special added tokens, user-defined ones plain added tokens; a
    # "control" token spelled outside the byte alphabet is a llama.cpp mislabel and skipped.
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, k in zip(tokens, types)
        if k == _CONTROL and set(t) <= alphabet
    ]
    if control:
        backend.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED and t in vocab
    ]
    if user:
        backend.add_tokens(user)
    return backend


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible spelling of bytes as printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers' table);
# any other name gets GPT-2's regex.
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        [
            "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
            "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe",
        ],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


# ----------------------------------------------------------------------------------------
# Hugging Face directories


def from_hf_dir(path: str | Path) -> Tokenizer | None:
    """The tokenizer in a Hugging Face style directory, or None if it has none.

    ``tokenizer.json`` is preferred over ``tokenizer.model``. Special token ids, the BOS
    convention and the chat template come from ``tokenizer_config.json`` (the ids
    :meth:`Tokenizer.save` writes, else the token strings), ``generation_config.json`` and
    ``config.json``; a chat template may also be in ``chat_template.jinja``.
    """
    path = Path(path)
    backend: tokenizers.Tokenizer | None = None
    proto: sp_pb2.ModelProto | None = None
    default_ids: dict[str, int] = {}
    if (path / HF_TOKENIZER_FILE).is_file():
        backend = tokenizers.Tokenizer.from_file(str(path / HF_TOKENIZER_FILE))
        lookup = backend.token_to_id
    elif (path / SP_MODEL_FILE).is_file():
        proto = sp_pb2.ModelProto()
        proto.ParseFromString((path / SP_MODEL_FILE).read_bytes())
        lookup = {p.piece: i for i, p in enumerate(proto.pieces)}.get
        spec = proto.trainer_spec
        default_ids = {
            name: i for name, i in (("bos", spec.bos_id), ("eos", spec.eos_id), ("pad", spec.pad_id)) if i >= 0
        }
    else:
        return None

    config = _read_json(path / CONFIG_FILE)
    sources = (_read_json(path / "generation_config.json"), _read_json(path / "config.json"))

    def token_id(name: str) -> int | None:
        if config.get(f"{name}_token_id") is not None:
            return int(config[f"{name}_token_id"])
        token = config.get(f"{name}_token")
        if isinstance(token, Mapping):
            token = token.get("content")
        if isinstance(token, str) and lookup(token) is not None:
            return lookup(token)
        for source in sources:
            if isinstance(source.get(f"{name}_token_id"), int):
                return source[f"{name}_token_id"]
        return default_ids.get(name)

    bos_id = token_id("bos")
    if "eos_token_ids" in config:
        eos = [int(i) for i in config["eos_token_ids"]]
    else:
        eos = [i for i in [token_id("eos")] if i is not None]
        for source in sources:
            eos.extend(_as_id_list(source.get("eos_token_id")))

    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in chat_template}
        chat_template = named.get("default", next(iter(named.values()), None))
    if chat_template is None and (path / "chat_template.jinja").is_file():
        chat_template = (path / "chat_template.jinja").read_text()

    add_bos = config.get("add_bos_token")
    if add_bos is None and backend is not None:
        # No flag: BOS is added if the tokenizer's own post-processor adds it.
        add_bos = bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    elif add_bos is None:
        add_bos = bos_id is not None  # SentencePiece models add BOS unless told otherwise

    kwargs = dict(
        bos_id=bos_id,
        eos_ids=eos,
        add_bos=add_bos,
        chat_template=chat_template,
        special_ids=[int(i) for i, t in config.get("added_tokens_decoder", {}).items() if t.get("special")],
        pad_id=token_id("pad"),
    )
    tokenizer: Tokenizer
    if backend is not None:
        tokenizer = HFTokenizer(backend, **kwargs)
    else:
        tokenizer = SentencePieceTokenizer(proto, **kwargs)
    tokenizer.eos_ids = _eos_ids(tokenizer, tokenizer.eos_ids)
    return tokenizer


def load(directory: str | Path) -> Tokenizer:
    """The tokenizer :meth:`Tokenizer.save` wrote (or any Hugging Face tokenizer directory)."""
    tokenizer = from_hf_dir(directory)
    if tokenizer is None:
        raise FileNotFoundError(f"no {HF_TOKENIZER_FILE} or {SP_MODEL_FILE} in {directory}")
    return tokenizer


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and a generation prompt; a
    template that writes the BOS text itself gets no second BOS."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    bos = tokenizer.bos_token
    return list(tokenizer.encode(text, add_bos=False if bos and text.startswith(bos) else None))


def empty_context_ids(bos_id: int | None, eos_ids: Sequence[int]) -> list[int]:
    """What an empty scoring context becomes: [BOS], else [first EOS] (lm-evaluation-harness's prefix)."""
    if bos_id is not None:
        return [int(bos_id)]
    if eos_ids:
        return [int(eos_ids[0])]
    raise ValueError("context is empty and the model has neither a BOS nor an EOS token to condition on")


def tokenize_context(tokenizer: Tokenizer, context: str, bos_id: int | None = None) -> list[int]:
    """A scoring context's ids: with BOS when the model adds one; an empty one becomes
    :func:`empty_context_ids` (``bos_id``: the model's BOS when the tokenizer has none)."""
    ids = list(tokenizer.encode(context))
    return ids or empty_context_ids(tokenizer.bos_id if bos_id is None else bos_id, tokenizer.eos_ids)


def tokenize_continuation(tokenizer: Tokenizer, continuation: str) -> list[int]:
    """A scoring continuation's ids: tokenized on its own, without BOS; ValueError when empty."""
    ids = list(tokenizer.encode(continuation, add_bos=False))
    if not ids:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
    return ids


def tokenize_pair(tokenizer: Tokenizer, context: str, continuation: str,
                  bos_id: int | None = None) -> tuple[list[int], list[int]]:
    """The one scoring convention (``jaxinfer score``, the Score RPC, evaluation, ``LLM.score``):
    :func:`tokenize_context` then :func:`tokenize_continuation`, scored as their concatenation."""
    return tokenize_context(tokenizer, context, bos_id), tokenize_continuation(tokenizer, continuation)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_ids(tokenizer: Tokenizer, eos: Sequence[int]) -> tuple[int, ...]:
    """The model's eos ids plus the special tokens that close a chat turn."""
    ids = list(eos)
    for token in END_OF_TURN_TOKENS:
        i = tokenizer.piece_to_id(token)
        if i is not None and tokenizer.is_special(i):
            ids.append(i)
    return tuple(dict.fromkeys(ids))


# ----------------------------------------------------------------------------------------
# helpers


def _longest_match_regex(words: Iterable[str]) -> re.Pattern[str] | None:
    """A regex finding the leftmost, then longest, of ``words`` (a trie, so it stays fast
    with thousands of words)."""
    trie: dict = {}
    for word in words:
        if not word:
            continue
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}
    if not trie:
        return None

    def pattern(node: dict) -> str:
        alternatives = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not alternatives:
            return ""
        body = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(pattern(trie))


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training
    masks in transformers); rendering just emits the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise ValueError(f"chat template error: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The sandboxed environment transformers renders chat templates in."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# ----------------------------------------------------------------------------------------
# streaming


class IncrementalDetokenizer:
    """Text deltas for a stream of generated ids.

    The concatenation of everything :meth:`add` and :meth:`flush` return equals
    ``tokenizer.decode(all_ids, skip_special)``. Each call decodes only a window: the
    tokens already emitted since the previous step (the prefix, which gives context such
    as SentencePiece's leading space) plus the new ones, and emits the difference. While
    the window's text ends in U+FFFD (a character whose bytes have not all arrived) nothing
    is emitted; :meth:`flush` emits what is left at the end.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._window: list[int] = []  # prefix tokens, then tokens not yet emitted
        self._read = 0  # window[:_read] is the prefix
        self._prefix_text = ""  # decode(window[:_read])

    def add(self, ids: Sequence[int]) -> str:
        """The text the new ids add (empty while a character is incomplete)."""
        self._window.extend(int(i) for i in ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if len(self._window) == self._read:
            return ""
        text = self._tokenizer.decode(self._window, self._skip_special)
        if text.endswith("\ufffd") and not final:
            return ""
        delta = text[len(self._prefix_text) :]
        # The tokens just emitted become the next prefix.
        del self._window[: self._read]
        self._read = len(self._window)
        self._prefix_text = self._tokenizer.decode(self._window, self._skip_special)
        return delta
