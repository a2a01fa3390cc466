"""Model classes, found by the `model_type` of a checkpoint's config.json.

Each entry is "module:Class"; the module is imported only when a model of that type is loaded,
so `import minivl` stays light. torch_impl.models has the same table with the same class names.
"""

MODEL_REGISTRY = {
    "internlm2": "minivl.models.internlm2:InternLM2ForCausalLM",
    "phi3": "minivl.models.phi3:Phi3ForCausalLM",
    "mpt": "minivl.models.mpt:MPTForCausalLM",
    "llama": "minivl.models.llama:LlamaForCausalLM",
    "qwen2": "minivl.models.qwen2:Qwen2ForCausalLM",
    "intern_vit_6b": "minivl.models.intern_vit:InternVisionModel",
    "internvl_chat": "minivl.models.internvl_chat:InternVLChatModel",
}
