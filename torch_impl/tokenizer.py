"""Text <-> token ids: the tokenizer is framework-free, so torch_impl uses minivl's (see minivl/tokenizer.py)."""
from minivl.tokenizer import SMOLLM2_SYSTEM_MESSAGE, IncrementalDecoder, Tokenizer

__all__ = ["Tokenizer", "IncrementalDecoder", "SMOLLM2_SYSTEM_MESSAGE"]
