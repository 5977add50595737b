"""Tokenizer: HF `tokenizers` (tokenizer.json) or SentencePiece (tokenizer.model), chat templates, streaming."""

import functools
import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(self, backend, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, config: dict | None = None):
        self.backend = backend  # tokenizers.Tokenizer or a SentencePiece adapter with the same methods
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.config = dict(config or {})

    @classmethod
    def from_dir_if_present(cls, directory: str | Path) -> "Tokenizer | None":
        """The directory's tokenizer, or None when it has no tokenizer files."""
        try:
            return cls.from_dir(directory)
        except FileNotFoundError:
            return None

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if (directory / "tokenizer.json").is_file():
            backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "tokenizer.model").is_file():
            backend = SentencePieceBackend(directory / "tokenizer.model", add_bos=config.get("add_bos_token", True))
        else:
            raise FileNotFoundError(f"{directory}: no tokenizer.json or tokenizer.model")
        return cls(backend, config.get("chat_template"), token_text(config.get("bos_token")),
                   token_text(config.get("eos_token")), config)

    def save(self, directory: str | Path) -> None:
        """tokenizer.json and tokenizer_config.json (HF tokenizers backends only)."""
        directory = Path(directory)
        if not isinstance(self.backend, HFTokenizer):
            raise TypeError("only tokenizer.json tokenizers can be saved")
        self.backend.save(str(directory / "tokenizer.json"))
        config = {**self.config, "chat_template": self.chat_template, "bos_token": self.bos_token,
                  "eos_token": self.eos_token}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation [{"role": ..., "content": ...}, ...], from the model's template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


@functools.lru_cache(maxsize=16)
def compiled_template(source: str) -> jinja2.Template:
    """A chat template compiled once (compiling took a few ms, more than the rest of a server request's
    handling), in a sandbox, as transformers renders them."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def token_text(token) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    return token.get("content") if isinstance(token, dict) else token


class StreamDecoder:
    """Turns generated token ids into text pieces as they come, never splitting a multi-byte character.

    Each step decodes the last few tokens and emits only text that is complete: a byte-level token that
    ends inside a UTF-8 sequence decodes to U+FFFD, so the text is held back until the next token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0   # start of the window that is decoded again for context
        self.read = 0     # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text):]


class SentencePieceBackend:
    """A tokenizer.model (LLaMA-2 style) through the `sentencepiece` package, with the tokenizers-like
    methods Tokenizer uses."""

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    def __init__(self, path: Path, add_bos: bool = True):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"{path}: reading a SentencePiece tokenizer.model needs the 'sentencepiece' "
                              f"package (pip install sentencepiece)") from e
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.add_bos = add_bos

    def encode(self, text: str, add_special_tokens: bool = True):
        ids = self.sp.encode(text)
        return self.Encoding(([self.sp.bos_id()] if add_special_tokens and self.add_bos else []) + ids)

    def decode(self, ids, skip_special_tokens: bool = True):
        return self.sp.decode(ids)

