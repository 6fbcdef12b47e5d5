from klaq.formats.tokenizer import PackageTokenizer, TokenizerFacts
from klaq.toolchain.data import pydoc_text


def test_hf_tokenizer_facts_rebuild_identically(tiny_llama_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama_dir)
    facts = TokenizerFacts.from_hf(hf)
    assert facts.model == "gpt2" and len(facts.tokens) == len(hf) and facts.merges
    assert facts.token_types[0] == 3 and facts.eos_id == 0
    tok = PackageTokenizer(facts)
    text = pydoc_text()[-20_000:]
    ids = tok.encode(text)
    assert ids == hf(text).input_ids
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>x")[0] == hf.convert_tokens_to_ids("<|im_start|>")


def test_smollm_pre_tokenizer_splits_digits():
    facts = TokenizerFacts(model="gpt2", tokens=["1", "2", "12", "a"], token_types=[1, 1, 1, 1], merges=["1 2"],
                           pre="smollm")
    assert PackageTokenizer(facts).encode("12") == [0, 1]  # llama.cpp's smollm regex isolates digits
    facts.pre = "gpt-2"
    assert PackageTokenizer(facts).encode("12") == [2]


def test_sentencepiece_bpe_from_scores_with_byte_fallback():
    from klaq.formats.tokenizer import spm_merges

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *byte_tokens, "▁", "h", "i", "▁h", "hi", "▁hi", "  "]
    types = [2, 3, 3, *[6] * 256, 1, 1, 1, 1, 1, 1, 1]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
    assert ("▁h", "i") in spm_merges(tokens, None) and ("h", "i") in spm_merges(tokens, None)
    facts = TokenizerFacts(model="llama", tokens=tokens, token_types=types, scores=scores, unk_id=0, bos_id=1,
                           eos_id=2, add_bos=True, add_space_prefix=False)
    tok = PackageTokenizer(facts)
    ids = tok.encode(" hi")
    assert ids == [1, tokens.index("▁hi")]
    assert tok.encode("hé")[1:] == [tokens.index("h"), 3 + 0xC3, 3 + 0xA9]  # é is not in the vocab: bytes
    assert tok.decode(tok.encode("hé  hi")[1:]) == "hé  hi"
    assert tok.encode("  ")[1:] == [tokens.index("  ")]  # whitespace-only tokens are spelled with U+2581
