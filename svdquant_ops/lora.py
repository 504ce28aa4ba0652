"""LoRA adapters on models quantized by svdquant_ops: ``load_lora``, ``set_lora_scale``, ``unload_lora``.

    from svdquant_ops.lora import load_lora, set_lora_scale, unload_lora

    load_lora(pipe.transformer, "style.safetensors", "style", scale=0.8)   # or load_lora(pipe, ...)
    set_lora_scale(pipe.transformer, "style", 0.5)                         # in place: no recompile
    unload_lora(pipe.transformer, "style")                                 # original branch, bit for bit

Adapters on SVDQuant linears are appended to the layer's low-rank branch (no requantization, no extra kernel);
16-bit and weight-only linears get an exact side branch. The implementation and its design notes are in
``svdquant_ops.integrations.lora``.
"""

from .integrations.lora import (FUSED_RANK_LIMIT, LoraLayer, enable_pipeline_lora, has_lora, load_lora, lora_scales,
                                read_lora, set_adapters, set_lora_scale, unload_lora)

__all__ = ["load_lora", "set_lora_scale", "unload_lora", "set_adapters", "lora_scales", "read_lora", "LoraLayer",
           "enable_pipeline_lora", "has_lora", "FUSED_RANK_LIMIT"]
