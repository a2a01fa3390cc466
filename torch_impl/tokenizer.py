"""Text <-> token ids: the tokenizer is framework-free, so torch_impl uses minivl's (see minivl/tokenizer.py)."""
from minivl.tokenizer import SMOLLM2_SYSTEM_MESSAGE, TOKENIZER_FILES, IncrementalDecoder, Tokenizer, load_tokenizer
from minivl.tokenizer_internlm2 import InternLM2Tokenizer

__all__ = ["Tokenizer", "InternLM2Tokenizer", "IncrementalDecoder", "load_tokenizer", "TOKENIZER_FILES",
           "SMOLLM2_SYSTEM_MESSAGE"]
