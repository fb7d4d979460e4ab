"""What the writer needs from any source format: the base class of the readers (hf.py and
gguf_reader.py). Its own module, so the readers need not import source.py, which picks one of them."""

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Dict, Iterator, List, Tuple, Union

import torch

from ..args import ModelArgs
from ..checkpoint import expected_shapes
from ..stored import QuantizedWeight


class Source(ABC):
    """A model to convert: Meta's params.json, then full tensors under Meta's names and in Meta's
    layout (interleaved RoPE pairs), read one at a time (floats, or a stored.QuantizedWeight for
    a weight the source holds as quantized blocks), and the tokenizer."""

    path: Path
    params: dict  # Meta's params.json, vocab_size included
    tied: bool  # no output.weight: the output projection reuses tok_embeddings
    dtype: torch.dtype  # the precision the float weights are stored in

    @property
    def args(self) -> ModelArgs:
        return ModelArgs.from_dict(self.params)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Meta name -> full shape of every tensor to write, in writing order."""
        return expected_shapes(self.args, tied=self.tied)

    @abstractmethod
    def files(self) -> List[Path]:
        """The files this model is read from (their identity tells one model from another)."""

    @abstractmethod
    def read(self, key: str) -> Union[torch.Tensor, QuantizedWeight]:
        """The full tensor under Meta's name `key`, in Meta's layout."""

    def tensors(self) -> Iterator[Tuple[str, Union[torch.Tensor, QuantizedWeight]]]:
        for key, shape in self.shapes().items():
            tensor = self.read(key)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{self.path}: tensor for '{key}' has shape {tuple(tensor.shape)}, expected "
                                 f"{shape} from the model's configuration; the file is inconsistent")
            yield key, tensor

    @abstractmethod
    def write_tokenizer(self, out_dir: Path) -> str:
        """Writes the tokenizer files into out_dir; returns the name of the one to pass as --tokenizer_path."""
