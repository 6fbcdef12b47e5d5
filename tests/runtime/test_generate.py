import numpy as np

from klaq.runtime.generate import generate, sample
from klaq.runtime.package import load_package


def test_greedy_generation_is_deterministic_and_streams(tiny_q4_package):
    pkg = load_package(str(tiny_q4_package))
    chunks = []
    a = generate(pkg, "def main():", max_new_tokens=10, stream=chunks.append, stop_at_eos=False)
    b = generate(pkg, "def main():", max_new_tokens=10, stop_at_eos=False)
    assert a.text == b.text and a.new_tokens == 10
    assert "".join(chunks) == a.text
    assert a.prompt_tokens == len(pkg.tokenizer.encode("def main():"))
    assert a.decode_tok_s > 0 and a.prefill_tok_s > 0 and a.peak_rss_mb > 0
    assert a.weight_bytes == pkg.file.weight_bytes > 0


def test_top_p_sampling_is_seeded():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    draws = [sample(logits, rng(), 1.0, 0.9) for _ in range(3)]
    assert len(set(draws)) == 1
    assert sample(logits, np.random.default_rng(0), 0.0, 0.9) == 1  # greedy
    # top-p 0.5 keeps only the most likely token
    assert {sample(logits, np.random.default_rng(s), 1.0, 0.5) for s in range(20)} == {1}


def test_sampled_generation_depends_on_seed(tiny_q4_package):
    pkg = load_package(str(tiny_q4_package))
    texts = {generate(pkg, "The", 12, temperature=1.5, top_p=0.95, seed=s, stop_at_eos=False).text for s in range(3)}
    assert len(texts) > 1


def test_report_bandwidth_against_target(tiny_q4_package):
    pkg = load_package(str(tiny_q4_package))
    rep = generate(pkg, "Hi", max_new_tokens=4, stop_at_eos=False)
    assert rep.target == "x86-cpu"  # the package's target
    tensors = pkg.file.tensors
    hp = pkg.file.hparams
    expected = pkg.file.weight_bytes - tensors["token_embd.weight"].nbytes  # untied: one embedding row
    assert rep.bytes_per_step > expected  # plus the KV cache
    assert rep.achieved_gbs == rep.bytes_per_step * rep.decode_tok_s / 1e9
    assert rep.bandwidth_fraction == rep.achieved_gbs / 50.0
    rep = generate(pkg, "Hi", max_new_tokens=2, target="rpi5")
    assert rep.bandwidth_fraction == rep.achieved_gbs / 17.0
    assert "% of rpi5" in rep.format() and hp.n_layers == 2


def test_report_says_whether_pdl_was_on(tiny_q4_package):
    from dataclasses import replace

    rep = generate(load_package(str(tiny_q4_package)), "Hi", max_new_tokens=2, stop_at_eos=False)
    assert rep.pdl is None and "PDL" not in rep.format()  # numpy on the CPU: no GPU kernels
    assert replace(rep, pdl=True).format().endswith("| PDL on")
    assert replace(rep, pdl=False).format().endswith("| PDL off")
