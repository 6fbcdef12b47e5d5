"""Tokenizer facts in llama.cpp's GGUF keys, and the ``tokenizers`` object built back from them.

Export fills :class:`TokenizerFacts` from a Hugging Face fast tokenizer (or copies them from a
source GGUF); the runtime rebuilds a ``tokenizers.Tokenizer`` from the same keys, so a package
carries exactly one tokenizer and both llama.cpp and klaq read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from klaq.errors import KlaqError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp pre-tokenizer names (llama-vocab.cpp) -> the regex splits they stand for.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2_RE],
    "gpt-2": [_GPT2_RE],
    "smollm": [r"\p{N}", _GPT2_RE],
    "starcoder": [r"\p{N}", _GPT2_RE],
    "llama-bpe": [_LLAMA3_RE],
    "llama3": [_LLAMA3_RE],
    "qwen2": [_QWEN2_RE],
}


@dataclass
class TokenizerFacts:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    # -- export side -------------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict) -> TokenizerFacts:
        """From a ``{key: python value}`` dict of ``tokenizer.*`` GGUF metadata."""
        g = lambda k, d=None: fields.get(f"tokenizer.ggml.{k}", d)  # noqa: E731
        if g("model") is None or g("tokens") is None:
            raise KlaqError("GGUF has no tokenizer (tokenizer.ggml.model / tokens missing)")
        return cls(
            model=g("model"), tokens=list(g("tokens")), token_types=list(g("token_type", [])),
            merges=list(g("merges", [])), scores=g("scores"), pre=g("pre"),
            bos_id=g("bos_token_id"), eos_id=g("eos_token_id"), unk_id=g("unknown_token_id"),
            pad_id=g("padding_token_id"), add_bos=bool(g("add_bos_token", False)),
            add_eos=bool(g("add_eos_token", False)), add_space_prefix=g("add_space_prefix"),
            chat_template=fields.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf(cls, hf_tokenizer, pre: str | None = None) -> TokenizerFacts:
        """From a transformers fast tokenizer with a byte-level BPE model."""
        spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
        model = spec["model"]
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise KlaqError("only byte-level BPE tokenizers can be exported from a Hugging Face "
                            "directory for now; export from a GGUF source to keep other tokenizers")
        vocab: dict[str, int] = dict(model["vocab"])
        special = set()
        for added in spec.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
            if added.get("special"):
                special.add(added["id"])
        tokens = [""] * (max(vocab.values()) + 1)
        for tok, i in vocab.items():
            tokens[i] = tok
        for i, tok in enumerate(tokens):  # llama.cpp rejects empty and duplicate tokens
            if not tok:
                tokens[i] = f"[PAD{i}]"
        types = [TOKEN_CONTROL if i in special else TOKEN_NORMAL for i in range(len(tokens))]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        tid = lambda t: None if t is None else hf_tokenizer.convert_tokens_to_ids(t)  # noqa: E731
        return cls(
            model="gpt2", tokens=tokens, token_types=types, merges=merges, pre=pre,
            bos_id=tid(hf_tokenizer.bos_token), eos_id=tid(hf_tokenizer.eos_token),
            unk_id=tid(hf_tokenizer.unk_token), pad_id=tid(hf_tokenizer.pad_token),
            add_bos=bool(getattr(hf_tokenizer, "add_bos_token", False)),
            chat_template=getattr(hf_tokenizer, "chat_template", None),
        )

    def write(self, writer) -> None:
        """Add the llama.cpp tokenizer keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.scores is not None:
            writer.add_token_scores(list(self.scores))
        for add, value in [(writer.add_bos_token_id, self.bos_id), (writer.add_eos_token_id, self.eos_id),
                           (writer.add_unk_token_id, self.unk_id), (writer.add_pad_token_id, self.pad_id)]:
            if value is not None:
                add(int(value))
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(bool(self.add_space_prefix))
        if self.chat_template:
            writer.add_chat_template(self.chat_template)

    # -- runtime side ------------------------------------------------------------------------
    def build(self):
        """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's reading of these keys."""
        if self.model == "gpt2":
            tok = self._build_byte_level()
        elif self.model == "llama":
            tok = self._build_sentencepiece()
        else:
            raise KlaqError(f"tokenizer model {self.model!r} is not supported by the klaq runtime yet "
                            "(supported: gpt2 byte-level BPE, llama SentencePiece BPE)")
        from tokenizers import AddedToken

        spelled = spm_spelling(self.tokens) if self.model == "llama" else self.tokens
        specials = [t for t, ty in zip(spelled, self.token_types, strict=True)
                    if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return tok

    def _build_byte_level(self):
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        vocab = {tok: i for i, tok in enumerate(self.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in self.merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        splits = PRE_TOKENIZER_SPLITS.get(self.pre or "default", PRE_TOKENIZER_SPLITS["default"])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        return tok

    def _build_sentencepiece(self):
        """SentencePiece BPE with byte fallback; spaces are spelled U+2581 in the vocabulary."""
        from tokenizers import Tokenizer, decoders, models, normalizers

        tokens = spm_spelling(self.tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in self.merges] if self.merges else spm_merges(tokens, self.scores)
        unk = tokens[self.unk_id] if self.unk_id is not None else None
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        steps = [normalizers.Replace(" ", SPIECE)]
        if self.add_space_prefix is not False:
            steps.insert(0, normalizers.Prepend(SPIECE))
        tok.normalizer = normalizers.Sequence(steps)
        dec = [decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.add_space_prefix is not False:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
        return tok


SPIECE = "\u2581"


def spm_spelling(tokens: list[str]) -> list[str]:
    """Gemma stores whitespace-only tokens with real spaces; the model looks them up as U+2581."""
    return [SPIECE * len(t) if " " in t and not t.strip() else t for t in tokens]


def spm_merges(tokens: list[str], scores: list[float] | None) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary, best first.

    Each token that splits into two vocabulary pieces is a merge, ranked by the token's score; when
    the scores do not rank the vocabulary (Gemma: almost all 0), by its position in the file.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    informative = scores is not None and len(set(scores)) > 0.5 * len(scores)
    rank = (lambda i: -scores[i]) if informative else (lambda i: i)  # noqa: E731
    merges = []
    for tok, i in vocab.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                merges.append((rank(i), vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


class PackageTokenizer:
    """encode/decode with the package's BOS/EOS conventions."""

    def __init__(self, facts: TokenizerFacts):
        self.facts = facts
        self._tok = facts.build()

    @property
    def eos_id(self) -> int | None:
        return self.facts.eos_id

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.facts.add_bos if add_bos is None else add_bos) and self.facts.bos_id is not None:
            ids = [self.facts.bos_id, *ids]
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)
