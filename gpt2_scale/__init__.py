"""gpt2-scale: reproduce GPT-2 from scratch and scale it."""

from gpt2_scale.model import GPT
from gpt2_scale.zoo import ModelConfig

__all__ = ["GPT", "ModelConfig"]
__version__ = "0.1.0"
