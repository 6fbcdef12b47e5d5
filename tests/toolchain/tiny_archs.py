"""Tiny random models of every architecture the engine supports, built from transformers configs."""

import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _config(model_type: str):
    import transformers as tf

    if model_type == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    if model_type == "opt":
        return tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1)
    if model_type == "gemma3_text":  # one sliding-window layer, one global: different masks / RoPE per block
        return tf.Gemma3TextConfig(**TINY, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "qwen3": tf.Qwen3Config}[model_type]
    extra = {"head_dim": 16} if model_type == "qwen3" else {}
    return cls(**TINY, **extra)


def _model(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(_config(model_type))
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    return m.eval()


def _ids(n=8, t=32, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))
