"""The configs are framework-free: torch_impl uses minivl's classes, so both packages share them."""
from minivl.config import *  # noqa: F401,F403
from minivl.config import __all__  # noqa: F401
