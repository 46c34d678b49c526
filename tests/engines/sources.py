"""The tiny seeded bf16 source models the engine conformance tier quantizes, one place for both engines.

Pure transformers + torch (no engine import), so that ``tests/engines/llmcompressor_reference.py`` can build the
same sources in the main environment, where llm-compressor runs. The two engines' tests use slightly different
DeepSeek-V3 shapes (SGLang's model class reads the router and YaRN rope fields real DeepSeek-V3 configs carry).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "deepseek")


def _llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def build_vllm_source(family: str, folder: Path) -> Path:
    """tests/engines/test_vllm.py's source: a Llama, or a DeepSeek-V3 (MLA with a q LoRA rank, 4 routed experts +
    1 shared, the first layer dense)."""
    if family == "llama":
        return _llama(folder)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=128,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, vocab_size=512,
        max_position_embeddings=256, topk_method="noaux_tc", scoring_func="sigmoid")
    DeepseekV3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def build_sglang_source(family: str, folder: Path) -> Path:
    """tests/engines/test_sglang.py's source: the same Llama, or a DeepSeek-V3 with q/kv LoRA ranks, MoE with
    shared experts, one dense layer first, and the router and rope fields SGLang's model class reads."""
    if family == "llama":
        return _llama(folder)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=512, q_lora_rank=128, kv_lora_rank=128,
        qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, moe_layer_freq=1,
        topk_method="noaux_tc", scoring_func="sigmoid", ep_size=1, max_position_embeddings=10240,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})
    DeepseekV3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def build_qwen3_moe_source(folder: Path) -> Path:
    """A Qwen3-MoE (every layer MoE, 4 experts, no shared expert): the MoE shape outside DeepSeek that SGLang's
    NVFP4 MoE scheme serves (hidden size a multiple of 128, expert intermediate size of 64)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=4,
                            num_experts_per_tok=2, decoder_sparse_step=1, vocab_size=512,
                            max_position_embeddings=256)
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder
