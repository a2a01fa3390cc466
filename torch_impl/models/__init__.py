"""Model classes, found by the `model_type` of a checkpoint's config.json.

Each entry is "module:Class"; the module is imported only when a model of that type is loaded,
so `import minivl` stays light. minivl.models has the same table with the same class names.
"""

MODEL_REGISTRY = {
    "internlm2": "torch_impl.models.internlm2:InternLM2ForCausalLM",
    "phi3": "torch_impl.models.phi3:Phi3ForCausalLM",
    "mpt": "torch_impl.models.mpt:MPTForCausalLM",
    "llama": "torch_impl.models.llama:LlamaForCausalLM",
    "qwen2": "torch_impl.models.qwen2:Qwen2ForCausalLM",
    "intern_vit_6b": "torch_impl.models.intern_vit:InternVisionModel",
    "internvl_chat": "torch_impl.models.internvl_chat:InternVLChatModel",
}
