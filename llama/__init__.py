"""Distributed Llama 2 / Llama 3.x inference in the style of Meta's reference repositories."""

from .args import ModelArgs
from .chat_format import ChatFormat, Dialog, Message
from .generation import ChatPrediction, CompletionPrediction, Llama, StreamPiece
from .model import Transformer
from .tokenizer import Tokenizer

__all__ = ["ChatFormat", "ChatPrediction", "CompletionPrediction", "Dialog", "Llama", "Message",
           "ModelArgs", "StreamPiece", "Tokenizer", "Transformer"]
