"""Turn a chat dialog into prompt token ids, in each model family's layout.

`ChatFormat(tokenizer)` (Meta's llama3 call) gives the layout of the tokenizer's model family;
llama/tokenizer.py re-exports these names, as Meta's llama3 keeps them there.
"""

import re
from typing import TYPE_CHECKING, List, Literal, Optional, Sequence, TypedDict, get_args

from llama.chat_template import warn_no_chat_template

if TYPE_CHECKING:  # only for hints: llama/tokenizer.py imports this module to re-export it
    from llama.tokenizer import Tokenizer

# "ipython" is Meta llama3's name for a tool's turn, "tool" llama-models' (its header says ipython).
Role = Literal["system", "user", "assistant", "ipython", "tool"]
ROLES = get_args(Role)


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]


def _check_messages(dialog: Sequence[Message]) -> None:
    if not dialog:
        raise ValueError("The dialog is empty; pass at least one message, e.g. [{'role': 'user', 'content': '...'}].")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"Message {i} must be a dict with 'role' and 'content' keys, got {msg!r}.")
        if msg["role"] not in ROLES:
            raise ValueError(f"Message {i} has unknown role {msg['role']!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(msg["content"], str):
            raise ValueError(f"Message {i} content must be a str, got {type(msg['content']).__name__}.")


class ChatFormat:
    """`ChatFormat(tokenizer)` builds the subclass whose layout fits the tokenizer's model family
    (as `Tokenizer(path)` builds the subclass that fits the file); `ChatFormat.for_tokenizer(tok)`
    is the same. A subclass built directly gives its own layout."""

    def __new__(cls, tokenizer: "Tokenizer"):
        if cls is ChatFormat:
            cls = _layout_for(tokenizer)
        return super().__new__(cls)  # Python then calls cls.__init__(tokenizer)

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer

    @staticmethod
    def for_tokenizer(tokenizer: "Tokenizer") -> "ChatFormat":
        return ChatFormat(tokenizer)

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        raise NotImplementedError

    def refusal(self, dialog: Dialog) -> Optional[str]:
        """Text to return as the reply instead of running this dialog, or None to run it."""
        return None


chat_format_for = ChatFormat.for_tokenizer


def _layout_for(tokenizer: "Tokenizer") -> type:
    # The one place that maps tokenizer kind -> chat layout.
    if tokenizer.kind == "huggingface":  # converted models of any family: their chat template tells
        return _huggingface_chat_format(tokenizer)
    formats = {
        "sentencepiece": Llama2ChatFormat,
        "tiktoken": Llama3ChatFormat,
    }
    if tokenizer.kind not in formats:
        raise ValueError(f"No chat format for a {tokenizer.kind!r} tokenizer; known kinds: {sorted(formats)}.")
    return formats[tokenizer.kind]


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


class Llama2ChatFormat(ChatFormat):
    """Llama 2 chat: [INST] ... [/INST] turns, each exchange framed by <s> ... </s>."""

    def refusal(self, dialog: Dialog) -> Optional[str]:
        # Llama 2 tags are plain text, so a user could forge turns with them;
        # refuse this dialog only, so the rest of a batch still runs.
        _check_messages(dialog)
        if any(tag in msg["content"] for msg in dialog for tag in SPECIAL_TAGS):
            return UNSAFE_ERROR
        return None

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        _check_messages(dialog)
        messages = list(dialog)
        if messages[0]["role"] == "system":
            if len(messages) < 2:
                raise ValueError("A Llama 2 dialog needs a user message after the system message.")
            system, first = messages[0], messages[1]
            merged = B_SYS + system["content"] + E_SYS + first["content"]
            messages = [{"role": first["role"], "content": merged}] + messages[2:]

        roles = [m["role"] for m in messages]
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
        if roles != expected or roles[-1] != "user":
            raise ValueError(
                f"Llama 2 chat needs roles in the order: optional system, then user, assistant, user, ... "
                f"ending with user; got {[m['role'] for m in dialog]}."
            )

        encode = self.tokenizer.encode
        tokens: List[int] = []
        for user, answer in zip(messages[::2], messages[1::2]):
            text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
            tokens += encode(text, bos=True, eos=True)
        tokens += encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens


class Llama3ChatFormat(ChatFormat):
    """Llama 3 chat: header tokens around each role, <|eot_id|> after each message."""

    def __init__(self, tokenizer: "Tokenizer"):
        super().__init__(tokenizer)
        self.begin_of_text = tokenizer.token_id("<|begin_of_text|>")
        self.start_header = tokenizer.token_id("<|start_header_id|>")
        self.end_header = tokenizer.token_id("<|end_header_id|>")
        self.eot = tokenizer.token_id("<|eot_id|>")

    def encode_header(self, message: Message) -> List[int]:
        """Meta llama3's method: the header that opens the message's turn."""
        return self._encode_header(message["role"])

    def _encode_header(self, role: str) -> List[int]:
        encode = self.tokenizer.encode
        role = "ipython" if role == "tool" else role  # as llama-models writes a tool's turn
        return [self.start_header] + encode(role, bos=False, eos=False) + [self.end_header] + encode("\n\n", bos=False, eos=False)

    def encode_message(self, message: Message) -> List[int]:
        # encode() yields no special ids by default, so content spelling "<|eot_id|>" stays text.
        content = self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        return self._encode_header(message["role"]) + content + [self.eot]

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        _check_messages(dialog)
        tokens = [self.begin_of_text]
        for message in dialog:
            tokens += self.encode_message(message)
        # Open the assistant's turn for the model to complete.
        return tokens + self._encode_header("assistant")


class ChatMLFormat(ChatFormat):
    """ChatML (SmolLM2, Qwen and others): each message is <|im_start|>role\ncontent<|im_end|>\n and
    the reply opens with <|im_start|>assistant\n; it ends at <|im_end|>, one of the tokenizer's stop
    tokens. Content is kept exactly as given (the templates of these models do not strip it).

    A template that writes a default system message when the dialog has none (SmolLM2's does)
    gets it here too, so prompts equal the model's own template."""

    def __init__(self, tokenizer: "Tokenizer"):
        super().__init__(tokenizer)
        self.im_start = tokenizer.token_id("<|im_start|>")
        self.im_end = tokenizer.token_id("<|im_end|>")
        self.default_system = default_system_message(getattr(tokenizer, "chat_template", None))

    def encode_message(self, message: Message) -> List[int]:
        # encode() never yields special ids, so content spelling "<|im_end|>" stays text.
        text = self.tokenizer.encode(f"{message['role']}\n{message['content']}", bos=False, eos=False)
        return [self.im_start] + text + [self.im_end] + self.tokenizer.encode("\n", bos=False, eos=False)

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        _check_messages(dialog)
        messages = list(dialog)
        if self.default_system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.default_system})
        tokens: List[int] = []
        for message in messages:
            tokens += self.encode_message(message)
        return tokens + [self.im_start] + self.tokenizer.encode("assistant\n", bos=False, eos=False)


# A literal system turn written by a ChatML template: '<|im_start|>system\n...<|im_end|>'.
_TEMPLATE_SYSTEM = re.compile(r"'<\|im_start\|>system(?:\n|\\n)([^'{}]*?)<\|im_end\|>")


def default_system_message(template: Optional[str]) -> Optional[str]:
    """The system message a ChatML chat template inserts by itself, if it has one."""
    match = _TEMPLATE_SYSTEM.search(template or "")
    return match.group(1).replace("\\n", "\n") if match else None


def _huggingface_chat_format(tokenizer: "Tokenizer") -> type:
    """The layout a converted model was tuned on: its chat template's markers decide, else its
    special tokens, else Llama 2's plain-text [INST] layout."""
    markers = [("<|start_header_id|>", Llama3ChatFormat), ("<|im_start|>", ChatMLFormat),
               ("[INST]", Llama2ChatFormat)]
    template = getattr(tokenizer, "chat_template", None) or ""
    layout = next((layout for text in (template, " ".join(tokenizer.special_tokens))
                   for marker, layout in markers if marker in text), Llama2ChatFormat)
    if not template:
        warn_no_chat_template(tokenizer.folder, _FORMAT_NAMES[layout])
    return layout


_FORMAT_NAMES = {Llama3ChatFormat: "Llama 3 header", ChatMLFormat: "ChatML", Llama2ChatFormat: "Llama 2 [INST]"}
