"""LLaMA architectures in miniature, defined once: the demo's base model and the tests' and benchmarks'.

Same architecture as LLaMA (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head), sizes that train
in seconds on a CPU. ``vocab_size`` is left out: it is the base tokenizer's.
"""

# The tests' and the CPU benchmarks' model: 2 layers x 64.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

# The demo's base model: 4 layers x 128, long enough context for its 128-token blocks and 256-token eval windows.
DEMO = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5)
