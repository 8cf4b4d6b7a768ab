"""gpt2repro: reproduce GPT-2 (124M) from scratch with a Hugging Face-native trainer."""

from .config import GPTConfig, TrainConfig
from .model import GPT

__all__ = ["GPT", "GPTConfig", "TrainConfig"]
__version__ = "0.1.0"
