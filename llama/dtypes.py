"""The names of the float precisions this runner computes and stores in, in one table."""

import torch

# Our short names, which --dtype and the convert record use; error messages list them in this order.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# torch's own names ("bfloat16", ...), which Hugging Face's config.json writes as its dtype.
TORCH_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPES.values()}
# Every name Llama.build(dtype=...) accepts.
ALIASES = {**DTYPES, **TORCH_NAMES, "half": torch.float16, "float": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """Our short name of one of the three precisions."""
    return next(name for name, d in DTYPES.items() if d == dtype)
