"""The chat template is found wherever a model folder keeps it (tokenizer_config.json,
chat_template.jinja, chat_template.json), by the runtime tokenizer and the converter alike; a
folder with none says once which layout is used instead."""

import json
import warnings

import pytest

from llama.chat_format import ChatFormat, ChatMLFormat
from llama.convert.tokenizer_files import copy_hf_tokenizer
from llama.tokenizer import Tokenizer

from .convert_helpers import write_tiny_tokenizer

# SmolLM2's template writes a default system turn; losing the template loses that turn.
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful bot.<|im_end|>\\n' }}"
            "{% endif %}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}")
SPECIALS = ["<|im_start|>", "<|im_end|>"]


def folder_saved_by_transformers(folder):
    """A tokenizer saved by transformers' own save_pretrained, template included."""
    from transformers import PreTrainedTokenizerFast

    write_tiny_tokenizer(folder)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=SPECIALS)
    tokenizer.chat_template = TEMPLATE
    for path in folder.iterdir():
        path.unlink()
    tokenizer.save_pretrained(str(folder))
    return folder


def move_template(folder, where):
    """Rewrites the folder so that the template lives only in `where`."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.json").unlink(missing_ok=True)
    if where == "tokenizer_config.json":
        config["chat_template"] = TEMPLATE
    elif where == "chat_template.jinja":
        (folder / where).write_text(TEMPLATE)
    else:
        (folder / where).write_text(json.dumps({"chat_template": TEMPLATE}))
    config_path.write_text(json.dumps(config))


def test_transformers_save_is_read_with_its_template(tmp_path):
    folder = folder_saved_by_transformers(tmp_path / "saved")
    tokenizer = Tokenizer(folder / "tokenizer.json")
    assert tokenizer.chat_template == TEMPLATE
    chat = ChatFormat.for_tokenizer(tokenizer)
    assert isinstance(chat, ChatMLFormat) and chat.default_system == "You are a helpful bot."
    prompt = tokenizer.decode(chat.encode_dialog_prompt([{"role": "user", "content": "Hi"}]))
    assert prompt.startswith("<|im_start|>system\nYou are a helpful bot.<|im_end|>\n<|im_start|>user\nHi")


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja", "chat_template.json"])
def test_runtime_and_converter_find_the_same_template(tmp_path, where):
    folder = folder_saved_by_transformers(tmp_path / "saved")
    move_template(folder, where)
    assert Tokenizer(folder / "tokenizer.json").chat_template == TEMPLATE
    out = tmp_path / "converted"
    out.mkdir()
    copy_hf_tokenizer(folder, {}, out)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert Tokenizer(out / "tokenizer.json").chat_template == TEMPLATE


def test_no_template_is_said_once_naming_the_files(tmp_path):
    folder = folder_saved_by_transformers(tmp_path / "saved")
    move_template(folder, "tokenizer_config.json")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(folder / "tokenizer.json")
    assert tokenizer.chat_template is None
    with pytest.warns(UserWarning) as caught:
        assert isinstance(ChatFormat.for_tokenizer(tokenizer), ChatMLFormat)  # from the special tokens
    message = str(caught[0].message)
    assert "no chat template found" in message and "ChatML" in message
    assert str(folder / "chat_template.jinja") in message and str(folder / "tokenizer_config.json") in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChatFormat.for_tokenizer(Tokenizer(folder / "tokenizer.json"))  # said once, not on every load
