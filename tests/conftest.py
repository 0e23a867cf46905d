"""Shared fixtures: tiny random SLM/LLM pairs built in memory, on the demo tokenizer.

Nothing here downloads anything or writes into the working tree (tmp_path only)."""

import os
import sys

# Offline before huggingface_hub is imported, which reads these once: the suite never needs
# the network, and a plain `python -m pytest -q tests` must not try it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

from demo.build import build_tokenizer  # noqa: E402

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()


def tiny_model(arch, tok, layers, width, extra_vocab=0, seed=0):
    """A random causal LM with no EOS id (so every decode runs its full length);
    initializer_range 0.2 gives peaked logits, far from ties, so exact comparisons mean
    something."""
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=len(tok) + extra_vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=width // 2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    return model_cls(config).eval()


# qwen2's LLM pads its lm_head beyond the tokenizer, as Qwen2.5-7B does beside -0.5B.
PAIRS = {"llama": ("llama", 0), "qwen2-padded": ("qwen2", 11), "qwen3": ("qwen3", 0)}


@pytest.fixture(scope="session", params=list(PAIRS))
def pair(request, tok):
    arch, extra = PAIRS[request.param]
    return tiny_model(arch, tok, 1, 32, seed=1), tiny_model(
        arch, tok, 2, 48, extra_vocab=extra, seed=2
    )


@pytest.fixture(scope="session")
def demo_pair():
    import r2r

    return r2r.load_pair(os.path.join(ROOT, "demo", "slm"), os.path.join(ROOT, "demo", "llm"))
