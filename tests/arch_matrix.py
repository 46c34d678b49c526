"""The architecture matrix: tiny random transformers models and what qconvert must plan for each.

Each case builds a seeded random model from its transformers config with tiny dimensions (hidden
128, so that group-128 schemes apply; 2 layers) and writes down, by hand, the set of weights that
must be quantized: ``{i}`` stands for every layer index and ``{e}`` for every expert index.
Nothing here calls qconvert: the expected sets are the test's own statement of what each
architecture's loaders quantize.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LAYERS = 2
EXPERTS = 4
HIDDEN = 128

ALL_SCHEMES = ("rtn4", "rtn8", "int8-block", "w8a8-int8", "fp8", "fp8-block", "fp8-tensor", "nvfp4", "mxfp4", "mxfp8")
# transformers 5.23 dequantizes per-expert MoE weights at load (both paths) only when they are packed
# (pack-quantized) or fp8 with a scale that broadcasts over the weight (per channel or per tensor):
# int-quantized experts (int8-block, w8a8-int8) and MXFP8 experts (fp8 with uint8 scales) fail its weight
# conversion, and so do fp8 block
# scales of experts larger than one block. Those schemes are not loadable for MoE in transformers.
MOE_SCHEMES = ("rtn4", "rtn8", "fp8", "fp8-tensor", "nvfp4", "mxfp4")
# Zero-point schemes (W4A16_ASYM / W8A16_ASYM): through transformers' compressed-tensors loader on one dense and one
# MoE architecture (the packed layout is rtn4's / rtn8's, with weight_zero_point beside the scales).
ASYM = ("int4-asym", "int8-asym")
# transformers 5.23 loads zero points only with dequantize=True: its compressed path registers weight_zero_point
# unpacked ([out, groups]) and refuses the packed one compressed-tensors writes ([out / (32 / bits), groups]) as a
# size mismatch; and its conversion of per-expert MoE weights fails (with dequantize=True it decompresses them
# without their zero points: compressed-tensors' "Asymmetric quant requires zero-point values"). Its report names
# the tensors; the error it raises, matched here, does not. The same for llm-compressor's identical bytes.
_ASYM_DENSE = {s: {"compressed": "ignore_mismatched_sizes"} for s in ASYM}
_ASYM_MOE = {s: {"compressed": "automatic conversion", "dequantize": "automatic conversion"} for s in ASYM}
# Packed schemes (rtn4, rtn8) leave no `.weight` on the module in the compressed path; Falcon's
# FalconLinear.forward and T5's weight initialisation read it, so only `dequantize=True` loads them.
PACKED = ("rtn4", "rtn8")
PACKED_LAYOUTS = (*PACKED, "nvfp4", "mxfp4")  # schemes that leave no `.weight` on a compressed module

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _llama_like(prefix: str = "model.layers.{i}") -> list[str]:
    return [f"{prefix}.self_attn.{p}" for p in _ATTN] + [f"{prefix}.mlp.{p}" for p in _MLP]


_TEXT = dict(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


@dataclass(frozen=True)
class ArchCase:
    name: str
    model_type: str
    config: dict
    expected: list[str]  # module templates ({i}: layer, {e}: expert) that must be quantized
    auto: str = "AutoModelForCausalLM"
    schemes: tuple[str, ...] = ALL_SCHEMES  # the schemes transformers loads for this architecture
    request: dict = field(default_factory=dict)  # extra QuantizeRequest fields the architecture needs
    inputs: str = "text"  # text | seq2seq | masked | vision
    skipped: dict[str, str] = field(default_factory=dict)  # module template → a word of its reason
    # Schemes whose compressed (non-dequantize) load path transformers itself cannot run for this
    # architecture (its modeling code reads `.weight` of a packed module): asserted to fail there.
    compressed_path_fails: tuple[str, ...] = ()
    # Schemes transformers loads but computes wrongly for this architecture, on both paths (NVFP4 MoE experts: logits
    # off by more than 100%, measured, for llm-compressor's identical bytes too): asserted wrong.
    transformers_wrong: tuple[str, ...] = ()
    # Schemes transformers refuses to load for this architecture, by path ("compressed": the default load,
    # "dequantize": CompressedTensorsConfig(dequantize=True)), with a word of its error: asserted to be refused.
    transformers_refuses: dict[str, dict[str, str]] = field(default_factory=dict)
    fast: bool = False  # also in the fast tier
    shards: int = 1
    # 3-D experts written per expert in vLLM's layout, which no transformers release loads: the test
    # asserts that transformers refuses them and checks each expert's weights against an independent cut
    # of the stored 3-D tensor (tests/test_architectures.py: EXPERT_CUTS) instead of comparing logits.
    experts_split: bool = False

    def expand(self, templates: list[str]) -> set[str]:
        out = set()
        for template in templates:
            for i in range(LAYERS) if "{i}" in template else [0]:
                for e in range(EXPERTS) if "{e}" in template else [0]:
                    out.add(template.format(i=i, e=e))
        return out

    @property
    def expected_modules(self) -> set[str]:
        return self.expand(self.expected)

    @property
    def expected_skipped(self) -> dict[str, str]:
        return {module: word for template, word in self.skipped.items() for module in self.expand([template])}


_MOE = dict(num_experts=EXPERTS, num_experts_per_tok=2)
_GRANITE = dict(_TEXT, num_local_experts=EXPERTS, num_experts_per_tok=2)
_GPT_OSS = dict(_TEXT, head_dim=32, num_local_experts=EXPERTS, num_experts_per_tok=2, intermediate_size=128,
                layer_types=["sliding_attention", "full_attention"], sliding_window=64)

CASES: list[ArchCase] = [
    ArchCase("llama", "llama", dict(_TEXT), _llama_like(), schemes=(*ALL_SCHEMES, *ASYM),
             transformers_refuses=_ASYM_DENSE, fast=True, shards=2),
    ArchCase("mistral", "mistral", dict(_TEXT, head_dim=32), _llama_like()),
    ArchCase("qwen2", "qwen2", dict(_TEXT), _llama_like()),
    ArchCase("qwen3", "qwen3", dict(_TEXT, head_dim=32), _llama_like()),
    ArchCase("qwen3_moe", "qwen3_moe",
             dict(_TEXT, head_dim=32, moe_intermediate_size=128, decoder_sparse_step=1, **_MOE),
             [f"model.layers.{{i}}.self_attn.{p}" for p in _ATTN]
             + [f"model.layers.{{i}}.mlp.experts.{{e}}.{p}" for p in _MLP],
             schemes=(*MOE_SCHEMES, *ASYM), skipped={"model.layers.{i}.mlp.gate": "router"}, fast=True,
             transformers_wrong=("nvfp4",), transformers_refuses=_ASYM_MOE),
    ArchCase("mixtral", "mixtral", dict(_TEXT, num_local_experts=EXPERTS, num_experts_per_tok=2),
             [f"model.layers.{{i}}.self_attn.{p}" for p in _ATTN]
             + [f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{p}" for p in ("w1", "w2", "w3")],
             schemes=MOE_SCHEMES, skipped={"model.layers.{i}.block_sparse_moe.gate": "router"},
             transformers_wrong=("nvfp4",)),
    ArchCase("phi3", "phi3", dict(_TEXT, num_key_value_heads=4, pad_token_id=0),
             ["model.layers.{i}.self_attn.qkv_proj", "model.layers.{i}.self_attn.o_proj",
              "model.layers.{i}.mlp.gate_up_proj", "model.layers.{i}.mlp.down_proj"]),
    ArchCase("gemma2", "gemma2", dict(_TEXT, head_dim=32), _llama_like()),
    ArchCase("gemma3", "gemma3_text", dict(_TEXT, head_dim=32, sliding_window=64), _llama_like()),
    ArchCase("deepseek_v3", "deepseek_v3",
             dict(_TEXT, moe_intermediate_size=128, n_routed_experts=EXPERTS, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=128,
                  kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=96, v_head_dim=128,
                  num_key_value_heads=4),
             ["model.layers.{i}.self_attn.q_a_proj", "model.layers.{i}.self_attn.q_b_proj",
              "model.layers.{i}.self_attn.kv_a_proj_with_mqa", "model.layers.{i}.self_attn.kv_b_proj",
              "model.layers.{i}.self_attn.o_proj",
              *[f"model.layers.0.mlp.{p}" for p in _MLP],
              *[f"model.layers.1.mlp.experts.{{e}}.{p}" for p in _MLP],
              *[f"model.layers.1.mlp.shared_experts.{p}" for p in _MLP]],
             schemes=MOE_SCHEMES, skipped={"model.layers.1.mlp.gate": "router"}, transformers_wrong=("nvfp4",)),
    ArchCase("opt", "opt", dict(hidden_size=HIDDEN, ffn_dim=256, num_hidden_layers=LAYERS, num_attention_heads=4,
                                vocab_size=256, max_position_embeddings=128, word_embed_proj_dim=HIDDEN),
             [f"model.decoder.layers.{{i}}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
             + ["model.decoder.layers.{i}.fc1", "model.decoder.layers.{i}.fc2"]),
    ArchCase("falcon", "falcon", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                      vocab_size=256, new_decoder_architecture=False, multi_query=True),
             ["transformer.h.{i}.self_attention.query_key_value", "transformer.h.{i}.self_attention.dense",
              "transformer.h.{i}.mlp.dense_h_to_4h", "transformer.h.{i}.mlp.dense_4h_to_h"],
             compressed_path_fails=PACKED_LAYOUTS),
    ArchCase("gpt_neox", "gpt_neox", dict(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=LAYERS,
                                          num_attention_heads=4, vocab_size=256, max_position_embeddings=128),
             ["gpt_neox.layers.{i}.attention.query_key_value", "gpt_neox.layers.{i}.attention.dense",
              "gpt_neox.layers.{i}.mlp.dense_h_to_4h", "gpt_neox.layers.{i}.mlp.dense_4h_to_h"]),
    ArchCase("bert", "bert", dict(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, vocab_size=256, max_position_embeddings=128),
             [f"bert.encoder.layer.{{i}}.attention.self.{p}" for p in ("query", "key", "value")]
             + ["bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.intermediate.dense",
                "bert.encoder.layer.{i}.output.dense", "cls.predictions.transform.dense"],
             auto="AutoModelForMaskedLM", inputs="masked"),
    ArchCase("olmo2", "olmo2", dict(_TEXT), _llama_like()),
    # GPT-2's c_attn/c_proj/c_fc are Conv1D ([in, out]): left unquantized, so nothing is quantized.
    ArchCase("gpt2", "gpt2", dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=256, n_positions=128),
             [], schemes=(),
             skipped={f"transformer.h.{{i}}.{p}": "Conv1D" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")},
             fast=True),
    # GraniteMoE and gpt-oss keep their experts in 3-D tensors: by default written per expert, as vLLM
    # loads them (GraniteMoE: Mixtral-style gate/up/down modules; gpt-oss: vLLM's streamed w13/w2 names, in
    # the weight-only int schemes only); `-kept` variants keep them in full precision (--keep-fused-experts),
    # which transformers loads.
    ArchCase("granitemoe", "granitemoe", _GRANITE,
             [f"model.layers.{{i}}.self_attn.{p}" for p in _ATTN]
             + [f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{p}" for p in _MLP],
             skipped={"model.layers.{i}.block_sparse_moe.router.layer": "router"}, experts_split=True),
    ArchCase("granitemoe-kept", "granitemoe", _GRANITE,
             [f"model.layers.{{i}}.self_attn.{p}" for p in _ATTN], request={"keep_fused_experts": True},
             skipped={"model.layers.{i}.block_sparse_moe.router.layer": "router",
                      "model.layers.{i}.block_sparse_moe.input_linear": "3-D",
                      "model.layers.{i}.block_sparse_moe.output_linear": "3-D"}),
    ArchCase("gpt_oss", "gpt_oss", _GPT_OSS,
             [f"model.layers.{{i}}.self_attn.{p}" for p in _ATTN]
             + [f"model.layers.{{i}}.mlp.experts.{{e}}.{p}" for p in ("w13", "w2")],
             schemes=PACKED, skipped={"model.layers.{i}.mlp.router": "router"}, experts_split=True, fast=True),
    ArchCase("gpt_oss-kept", "gpt_oss", _GPT_OSS,
             [f"model.layers.{{i}}.self_attn.{p}" for p in _ATTN], request={"keep_fused_experts": True},
             skipped={"model.layers.{i}.mlp.router": "router",
                      "model.layers.{i}.mlp.experts.gate_up_proj": "3-D",
                      "model.layers.{i}.mlp.experts.down_proj": "3-D"}),
    ArchCase("t5", "t5", dict(d_model=HIDDEN, d_ff=256, d_kv=32, num_layers=LAYERS, num_decoder_layers=LAYERS,
                              num_heads=4, vocab_size=256, relative_attention_num_buckets=8),
             [f"{stack}.block.{{i}}.layer.0.SelfAttention.{p}" for stack in ("encoder", "decoder")
              for p in "qkvo"]
             + [f"decoder.block.{{i}}.layer.1.EncDecAttention.{p}" for p in "qkvo"]
             + ["encoder.block.{i}.layer.1.DenseReluDense.wi", "encoder.block.{i}.layer.1.DenseReluDense.wo",
                "decoder.block.{i}.layer.2.DenseReluDense.wi", "decoder.block.{i}.layer.2.DenseReluDense.wo"],
             auto="AutoModelForSeq2SeqLM", inputs="seq2seq", compressed_path_fails=PACKED_LAYOUTS,
             skipped={"encoder.block.0.layer.0.SelfAttention.relative_attention_bias": "embedding",
                      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias": "embedding"},
             fast=True),
]

_VL_TEXT = dict(_TEXT, head_dim=32)
CASES += [
    ArchCase("qwen2_vl", "qwen2_vl",
             dict(text_config=dict(_VL_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                                              "rope_theta": 10000.0}),
                  vision_config=dict(depth=1, embed_dim=128, hidden_size=128, num_heads=2, mlp_ratio=2,
                                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                  image_token_id=250, video_token_id=251, vision_start_token_id=252),
             _llama_like(),  # saved under the hub names: transformers renames them at load
             auto="AutoModelForImageTextToText",
             skipped={"visual.blocks.0.attn.qkv": "vision", "visual.merger.mlp.0": "vision"},
             fast=False),
    ArchCase("llava", "llava",
             dict(text_config=dict(_TEXT, model_type="llama"),
                  vision_config=dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                                     projection_dim=128),
                  image_token_index=250, vision_feature_layer=-1),
             _llama_like("language_model.model.layers.{i}"),
             auto="AutoModelForImageTextToText",
             skipped={"multi_modal_projector.linear_1": "vision",
                      "vision_tower.encoder.layers.0.self_attn.q_proj": "vision"}),
    ArchCase("gemma3_mm", "gemma3",
             dict(text_config=dict(_TEXT, head_dim=32, sliding_window=64, model_type="gemma3_text"),
                  vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
                  mm_tokens_per_image=4, image_token_index=250, boi_token_index=251, eoi_token_index=252),
             _llama_like("language_model.model.layers.{i}"),
             auto="AutoModelForImageTextToText",
             skipped={"vision_tower.encoder.layers.0.self_attn.q_proj": "vision"}),
]
