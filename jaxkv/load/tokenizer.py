"""Tokenizers: always a ``transformers.PreTrainedTokenizerFast``, from a Hugging Face directory or a GGUF file.

Conventions
-----------
* One type everywhere, so encode/decode/``apply_chat_template`` behave the same whatever the source.
* Hugging Face directory: ``AutoTokenizer.from_pretrained(dir)``; ``None`` when the directory has no
  tokenizer files (e.g. a bare checkpoint of random weights in the tests).
* GGUF with ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE): the ``tokenizers.Tokenizer`` is built
  here from the embedded tokens and merges. The pre-tokenizer follows ``tokenizer.ggml.pre`` the way
  llama.cpp does (``llama-vocab.cpp``), which for ``smollm`` means *digits split one by one*, then the
  GPT-2 regex -- the same as SmolLM2's own ``tokenizer.json``. (transformers' GGUF converter has no
  entry for ``smollm`` and falls back to the plain GPT-2 regex; the two agree on any text whose numbers
  are ASCII digits, since the vocabulary has no merges of them, but differ on e.g. ``x²``.)
* Tokens of type 3 (control) become special tokens, type 4 (user-defined) added tokens, so that
  ``<|im_start|>`` in a chat template encodes to its single id. BOS/EOS are added only when the file's
  ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say so (SmolLM2: neither).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxkv.errors import TokenizerError

# Split regexes (the ones llama.cpp uses per ``tokenizer.ggml.pre``); None = the GPT-2 regex built into
# tokenizers' ByteLevel pre-tokenizer.
_GPT2 = None
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (split digits individually first, split regex).
GGUF_PRE_TOKENIZERS: dict[str, tuple[bool, str | None]] = {
    # llama.cpp: STARCODER / REFACT / SMOLLM / CODESHELL = "\p{N}" then the GPT-2 regex.
    "smollm": (True, _GPT2),
    "starcoder": (True, _GPT2),
    "refact": (True, _GPT2),
    "codeshell": (True, _GPT2),
    "gpt-2": (False, _GPT2),
    "gpt2": (False, _GPT2),
    "mpt": (False, _GPT2),
    "olmo": (False, _GPT2),
    "llama3": (False, _LLAMA3),
    "llama-v3": (False, _LLAMA3),
    "llama-bpe": (False, _LLAMA3),
    "smaug-bpe": (False, _LLAMA3),
    "falcon3": (False, _LLAMA3),
    "qwen2": (False, _QWEN2),
    "deepseek-r1-qwen": (False, _QWEN2),
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_hf_tokenizer(model_dir: str | Path):
    """``AutoTokenizer.from_pretrained(model_dir)``, or None when the directory has no tokenizer files."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in _HF_TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, ImportError ...)
        raise TokenizerError(f"{model_dir}: could not load the tokenizer ({type(e).__name__}: {e})") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TokenizerError(
            f"{model_dir}: tokenizer is a {type(tok).__name__}, jaxkv needs a fast tokenizer"
        )
    return tok


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id, spelling any token written outside the byte-level alphabet in that alphabet.

    Real byte-level tokens only use the 256 printable stand-ins for bytes; a token using other
    characters (a control token mislabelled by a converter) is re-spelled from its UTF-8 bytes so
    that the BPE model accepts it. Same rule as transformers' GGUF converter.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    return vocab


def tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str = "gguf"):
    """Build a ``PreTrainedTokenizerFast`` from GGUF key/value metadata (byte-level BPE only)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise TokenizerError(f"{source}: the file has no embedded tokenizer (tokenizer.ggml.model)")
    if kind != "gpt2":
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model={kind!r} is not supported; jaxkv reads byte-level BPE ('gpt2') "
            "GGUF tokenizers only. Load the model's Hugging Face directory instead."
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(
            f"{source}: tokenizer.ggml.pre={pre!r} is not supported (supported: {sorted(GGUF_PRE_TOKENIZERS)})"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError(f"{source}: byte-level BPE tokenizer without tokenizer.ggml.merges")

    vocab = _byte_level_vocab(tokens)
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tk = Tokenizer(bpe)
    split_digits, regex = GGUF_PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    tk.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()

    # Only tokens present in the vocabulary under their own spelling: adding them keeps their ids and
    # only makes the tokenizer match them whole in raw text instead of cutting them into byte-level
    # pieces. A re-spelled (mislabelled) one would instead get a new id past the model's vocabulary.
    special = [t for t, ty in zip(tokens, token_types) if ty == _CONTROL and t in vocab]
    user = [t for t, ty in zip(tokens, token_types) if ty == _USER_DEFINED and t in vocab]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return None if idx is None or not 0 <= int(idx) < len(tokens) else tokens[int(idx)]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        pieces, specials = ["$A:0"], []
        if add_bos:
            pieces.insert(0, f"{bos}:0")
            specials.append((bos, int(meta["tokenizer.ggml.bos_token_id"])))
        if add_eos:
            pieces.append(f"{eos}:0")
            specials.append((eos, int(meta["tokenizer.ggml.eos_token_id"])))
        tk.post_processor = processors.TemplateProcessing(single=" ".join(pieces), special_tokens=specials)

    kwargs = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        **{k: v for k, v in kwargs.items() if v is not None},
        chat_template=meta.get("tokenizer.chat_template"),
        # Byte-level BPE round-trips exactly; the legacy clean-up would turn "a ." into "a.".
        clean_up_tokenization_spaces=False,
    )


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer embedded in a GGUF file (see :func:`tokenizer_from_gguf_metadata`)."""
    from jaxkv.load.gguf import gguf_metadata, open_gguf

    return tokenizer_from_gguf_metadata(gguf_metadata(open_gguf(path)), source=str(path))
