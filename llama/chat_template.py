"""Where a Hugging Face model folder keeps its chat template. One lookup serves both the converter
(which copies the template into the tokenizer_config.json it writes) and the runtime tokenizer
(which may be pointed at a folder saved by transformers directly)."""

import json
import warnings
from pathlib import Path
from typing import Optional, Set

# In the order they are searched: transformers 4 writes the template into tokenizer_config.json,
# transformers 5 into chat_template.jinja; some processors save chat_template.json.
TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")

_warned: Set[str] = set()


def json_object(path: Path) -> dict:
    """A JSON file's top-level object; {} when the file is absent or holds something else."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the download may be incomplete, fetch it again") from None
    return data if isinstance(data, dict) else {}


def _default_of(template) -> Optional[str]:
    if isinstance(template, list):  # several named templates: the "default" one is for chat
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None


def find_chat_template(folder: Path, tokenizer_config: Optional[dict] = None) -> Optional[str]:
    """The chat template saved in `folder`, or None when none of TEMPLATE_FILES holds one.
    tokenizer_config: that folder's tokenizer_config.json when the caller has read it already."""
    folder = Path(folder)
    if tokenizer_config is None:
        tokenizer_config = json_object(folder / TEMPLATE_FILES[0])
    template = _default_of(tokenizer_config.get("chat_template"))
    if template is None and (folder / TEMPLATE_FILES[1]).is_file():
        template = _default_of((folder / TEMPLATE_FILES[1]).read_text(encoding="utf-8"))
    if template is None:
        template = _default_of(json_object(folder / TEMPLATE_FILES[2]).get("chat_template"))
    return template


def warn_no_chat_template(folder: Path, chosen_format: str) -> None:
    """Says once per folder that no template was found, where it was looked for, and which chat
    layout is used instead."""
    folder = Path(folder)
    if str(folder) in _warned:
        return
    _warned.add(str(folder))
    looked = ", ".join(str(folder / name) for name in TEMPLATE_FILES)
    warnings.warn(f"no chat template found (looked in {looked}); chat prompts use the {chosen_format} format, "
                  f"told by the tokenizer's special tokens (Llama 2 [INST] when they tell nothing). Copy the "
                  f"model's chat_template.jinja or tokenizer_config.json into {folder} if its replies look wrong.",
                  stacklevel=3)
