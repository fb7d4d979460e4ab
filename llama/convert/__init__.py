"""Importing models into Meta's checkpoint layout: a Hugging Face Llama folder (config.json,
safetensors, tokenizer.json) or a GGUF file becomes params.json + consolidated.NN.pth split the
way Meta splits them, plus tokenizer.json + tokenizer_config.json.

    python -m llama.convert --source PATH --out DIR [--shards N] [--dtype auto|bf16|fp16|fp32]
                            [--quantize int4|int8 [--quant_group G]]

A GGUF's quantized blocks are kept as they are (llama/stored.py) unless --dtype asks for floats;
--quantize stores the linear layers quantized, so that loading does no quantization.

One concern per module: base.py (what a reader provides), source.py (picking one), hf.py and
gguf_reader.py (the two readers), dequant.py (GGUF tensor types), params.py (params.json),
gguf_tokenizer.py and tokenizer_files.py (tokenizers), writer.py (the output folder).
"""

from pathlib import Path
from typing import Optional, Union

from ..quantize import DEFAULT_GROUP

from .source import Source, open_source
from .writer import write_model

__all__ = ["Source", "convert", "open_source"]


def convert(source: Union[str, Path], out: Union[str, Path], shards: int = 1, dtype: str = "auto",
            progress: bool = True, quantize: Optional[str] = None, group: int = DEFAULT_GROUP) -> dict:
    """Converts the model at `source` into `out`; returns the record also saved as out/convert.json
    (with "reused": True when `out` already held this conversion and nothing was written). See
    write_model for dtype and quantize."""
    return write_model(open_source(Path(source)), Path(out), shards, dtype, progress, quantize, group)
