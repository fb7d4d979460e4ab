"""A Hugging Face tokenizer.json (converted models), run by the `tokenizers` library.

`Tokenizer(path)` (llama/tokenizer.py) builds it for a JSON file."""

import json
import re
from pathlib import Path
from typing import AbstractSet, Dict, List, Sequence, Union

import tokenizers

from .chat_template import find_chat_template
from .tokenizer import PathLike, Tokenizer, _check_file, _ids


def _bytes_of_byte_level_chars() -> Dict[str, int]:
    """GPT-2's byte-level spelling: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (controls, space, ...) for the characters 256, 257, ... in byte order. Returns char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in printable]
    chars.update({chr(256 + i): b for i, b in enumerate(others)})
    return chars


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_text(value: object) -> Union[str, None]:
    # tokenizer_config.json spells a token as "<s>" or as {"content": "<s>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (what `python -m llama.convert` writes), with the special
    tokens named in tokenizer_config.json beside it: bos_token, eos_token, pad_token, add_bos_token,
    chat_template, and "stop_tokens" (every token that ends a reply).

    encode(bos=True) adds the BOS token only for models whose own tokenizer does (add_bos_token);
    SmolLM2, for one, starts its texts without it. Text spelling a special token ("<|im_end|>")
    is encoded as plain text unless allowed_special names it, as with the other kinds."""

    kind = "huggingface"
    # End-of-turn tokens of the chat formats: replies stop at them whenever the model has them.
    END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>")

    def __init__(self, model_path: PathLike):
        path = Path(model_path)
        _check_file(path)
        hint = "Pass --tokenizer_path pointing at the tokenizer.json of a model converted by `python -m llama.convert`."
        try:
            self.model = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path} could not be loaded as a Hugging Face tokenizer.json ({e}). {hint}") from None
        # Even with add_special_tokens=False, `tokenizers` turns "<|im_end|>" written in the text into
        # the special id; this switch makes it spell such text out with ordinary tokens instead.
        self.model.encode_special_tokens = True
        config_path = path.parent / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{config_path} is missing: it names the BOS/EOS tokens of the tokenizer.json beside it. Convert "
                f"the model with `python -m llama.convert`, or copy the model's tokenizer_config.json there."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON ({e}); convert the model again.") from None

        self.n_words = self.model.get_vocab_size(with_added_tokens=True)
        added = self.model.get_added_tokens_decoder()
        self._added_text = {i: token.content for i, token in added.items()}
        self.special_tokens = {token.content: i for i, token in sorted(added.items()) if token.special}
        self.bos_id = self._id_of(config.get("bos_token"), config_path)
        self.eos_id = self._id_of(config.get("eos_token"), config_path)
        self.pad_id = self._id_of(config.get("pad_token"), config_path)
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # not stated: does the tokenizer's own post-processor add it?
            ids = self.model.encode("a", add_special_tokens=True).ids
            add_bos = bool(ids) and ids[0] == self.bos_id
        self.add_bos = bool(add_bos) and self.bos_id >= 0
        self.chat_template = find_chat_template(path.parent, config)
        stops = [self.eos_id] + [self._id_of(t, config_path) for t in config.get("stop_tokens") or []]
        stops += [self.special_tokens[t] for t in self.END_OF_TURN if t in self.special_tokens]
        self.stop_tokens = [t for i, t in enumerate(stops) if t >= 0 and t not in stops[:i]]
        self._piece_bytes: Union[List[bytes], None] = None  # built on first decode_bytes
        self._strips_first_space = False
        self._path = path
        self.folder = path.parent  # where the chat template was looked for

    def _id_of(self, value: object, config_path: Path) -> int:
        text = _token_text(value)
        if text is None:
            return -1
        token_id = self.model.token_to_id(text)
        if token_id is None:
            raise ValueError(f"{config_path} names the token {text!r}, which the tokenizer.json beside it does not "
                             f"have; the two files belong to different models")
        return token_id

    def _adds_bos(self) -> bool:
        return self.add_bos

    def _encode(self, s: str, allowed: AbstractSet[str]) -> List[int]:
        allowed = sorted(allowed & set(self.special_tokens), key=len, reverse=True)
        if not allowed:
            return self.model.encode(s, add_special_tokens=False).ids
        # As tiktoken does: cut the text at each allowed special token (the longest first where two
        # start at the same place), encode the text between as plain text.
        ids: List[int] = []
        start = 0
        for match in re.finditer("|".join(map(re.escape, allowed)), s):
            if match.start() > start:
                ids += self.model.encode(s[start:match.start()], add_special_tokens=False).ids
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        if start < len(s):
            ids += self.model.encode(s[start:], add_special_tokens=False).ids
        return ids

    def decode(self, t: Union[int, Sequence[int]]) -> str:
        return self.model.decode(_ids(t), skip_special_tokens=False)

    def decode_bytes(self, t: Sequence[int]) -> bytes:
        if self._piece_bytes is None:
            self._piece_bytes = self._build_piece_bytes()
        table = self._piece_bytes  # ids past the tokenizer (a padded embedding's) have no text
        out = b"".join(table[int(x)] if int(x) < len(table) else b"" for x in t)
        if self._strips_first_space and out.startswith(b" "):
            first = next((int(x) for x in t if int(x) not in self._added_text), None)
            if first is not None and (self.model.id_to_token(first) or "").startswith("\u2581"):
                out = out[1:]  # like decode(): the prefix space SentencePiece-style models add is dropped
        return out

    def token_pieces(self) -> List[bytes]:
        if self._piece_bytes is None:
            self._piece_bytes = self._build_piece_bytes()
        return list(self._piece_bytes)

    def _build_piece_bytes(self) -> List[bytes]:
        decoder = json.loads(self._path.read_text(encoding="utf-8")).get("decoder") or {}
        steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        types = {step.get("type") for step in steps}
        self._strips_first_space = "Strip" in types or any(
            step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never" for step in steps)
        byte_level = "ByteLevel" in types
        chars = _bytes_of_byte_level_chars()
        table = []
        for i in range(self.n_words):
            piece = self.model.id_to_token(i)
            if i in self._added_text:
                table.append(self._added_text[i].encode("utf-8"))
            elif piece is None:
                table.append(b"")
            elif byte_level and all(c in chars for c in piece):
                table.append(bytes(chars[c] for c in piece))
            elif _BYTE_PIECE.fullmatch(piece):
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

