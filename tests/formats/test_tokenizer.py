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
