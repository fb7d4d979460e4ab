"""Distributed Llama 2 / Llama 3.x inference in the style of Meta's reference repositories."""

from .compiling import use_persistent_compile_cache

# First: importing torch._dynamo (which much of PyTorch does) fixes Inductor's cache folder, in /tmp.
use_persistent_compile_cache()

from .args import ModelArgs  # noqa: E402
from .chat_format import ChatFormat, Dialog, Message  # noqa: E402
from .generation import ChatPrediction, CompletionPrediction, Llama, StreamPiece  # noqa: E402
from .model import Transformer  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

__all__ = ["ChatFormat", "ChatPrediction", "CompletionPrediction", "Dialog", "Llama", "Message",
           "ModelArgs", "StreamPiece", "Tokenizer", "Transformer"]
