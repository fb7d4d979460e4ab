"""The tokenizer files of a converted model: tokenizer.json (Hugging Face `tokenizers` format) and
tokenizer_config.json beside it, naming the special tokens the runner needs.

tokenizer_config.json keeps Hugging Face's keys (bos_token, eos_token, pad_token, add_bos_token,
chat_template), so transformers can load the folder's tokenizer too, plus one of ours:
"stop_tokens", every token that ends a reply (eos, and the chat format's end-of-turn token).
"""

import json
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from ..chat_template import find_chat_template, json_object

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def write_tokenizer_config(out_dir: Path, *, bos: Optional[str], eos: Optional[str], pad: Optional[str],
                           unk: Optional[str], add_bos: bool, chat_template: Optional[str],
                           stop_tokens: Iterable[str]) -> None:
    stops: List[str] = []
    for token in [eos, *stop_tokens]:
        if token is not None and token not in stops:
            stops.append(token)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
        "add_bos_token": bool(add_bos), "add_eos_token": False,
        "stop_tokens": stops,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (Path(out_dir) / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json spells a token as a string or as {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> List[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def copy_hf_tokenizer(folder: Path, model_config: dict, out_dir: Path) -> str:
    """Copies a Hugging Face folder's tokenizer into out_dir; returns the file to pass as --tokenizer_path.
    A folder with only tokenizer.model (SentencePiece or tiktoken) keeps that file."""
    folder, out_dir = Path(folder), Path(out_dir)
    source = folder / TOKENIZER_JSON
    if not source.is_file():
        for candidate in (folder / "tokenizer.model", folder / "original" / "tokenizer.model"):
            if candidate.is_file():
                shutil.copyfile(candidate, out_dir / "tokenizer.model")
                return "tokenizer.model"
        raise FileNotFoundError(f"{folder} has no tokenizer.json (or tokenizer.model); fetch the model's tokenizer "
                                f"files into that folder")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(source))
    except Exception as e:
        raise ValueError(f"{source} cannot be read by the tokenizers library ({e}); fetch it again") from None
    config = json_object(folder / TOKENIZER_CONFIG)

    def named(key: str) -> Optional[str]:
        text = _token_text(config.get(key))
        if text is None:  # fall back to the id in config.json
            ids = _ids(model_config.get(f"{key}_id"))
            text = tokenizer.id_to_token(ids[0]) if ids else None
        return text

    bos, eos = named("bos_token"), named("eos_token")
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # not stated: see whether the tokenizer's own post-processor adds it
        ids = tokenizer.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and bool(ids) and ids[0] == tokenizer.token_to_id(bos)
    generation = json_object(folder / "generation_config.json")
    stop_ids = _ids(generation.get("eos_token_id")) + _ids(model_config.get("eos_token_id"))
    stops = [tokenizer.id_to_token(i) for i in stop_ids if tokenizer.id_to_token(i) is not None]
    shutil.copyfile(source, out_dir / TOKENIZER_JSON)
    write_tokenizer_config(out_dir, bos=bos, eos=eos, pad=named("pad_token"), unk=named("unk_token"),
                           add_bos=add_bos, chat_template=find_chat_template(folder, config), stop_tokens=stops)
    return TOKENIZER_JSON
