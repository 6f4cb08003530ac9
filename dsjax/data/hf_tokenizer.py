"""HF `tokenizer.json` tokenizers (DeepSeek ships a byte-level BPE) behind dsjax's Tokenizer interface.

Special tokens and the chat template come from `tokenizer_config.json` beside the tokenizer
(falling back to `special_tokens_map.json`), as transformers reads them; the template renders
with the same Jinja settings transformers uses, so prompts match what the checkpoint was trained on.
"""
import datetime
import json
import pathlib
from typing import Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

from dsjax.data import corpus

TOKENIZER_FILE = 'tokenizer.json'
CONFIG_FILE = 'tokenizer_config.json'
SPECIAL_TOKENS_FILE = 'special_tokens_map.json'


def _token_text(entry) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(entry, dict):
        return entry.get('content')
    return entry


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: unlike Jinja's own, it keeps non-ASCII text readable.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class HFTokenizer:
    """A `tokenizers` tokenizer with the checkpoint's bos/eos/pad tokens and chat template."""

    def __init__(self, path):
        """`path`: a tokenizer.json file, or a directory (a HF checkpoint) holding one."""
        self.path = str(path)
        p = pathlib.Path(path)
        file = p / TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            raise corpus.DataError(f'data.tokenizer_path={self.path!r}: no {file} (give a tokenizer.json file or a '
                                   'HF checkpoint directory that holds one)')
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise corpus.DataError(
                f'data.tokenizer_path={self.path!r}: {file} is not a tokenizers JSON file: {e}') from e
        config = self._read_json(file.parent / CONFIG_FILE)
        special = self._read_json(file.parent / SPECIAL_TOKENS_FILE)
        self.special_tokens = {key: _token_text(config.get(key) or special.get(key))
                               for key in ('bos_token', 'eos_token', 'pad_token', 'unk_token')}
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        missing = [k for k in ('bos_token', 'eos_token') if k not in self.special_tokens]
        if missing:
            raise corpus.DataError(
                f'data.tokenizer_path={self.path!r}: {" and ".join(missing)} not set in '
                f'{file.parent / CONFIG_FILE} or {SPECIAL_TOKENS_FILE}; dsjax frames documents with both')
        self.bos_id = self._id('bos_token')
        self.eos_id = self._id('eos_token')
        # Padding is masked by segment ids, so its id only needs to be a real one; DeepSeek pads with eos.
        self.pad_id = self._id('pad_token') if 'pad_token' in self.special_tokens else self.eos_id
        template = config.get('chat_template')
        if isinstance(template, list):  # named templates: [{'name': ..., 'template': ...}]
            template = {t['name']: t['template'] for t in template}.get('default')
        self.chat_template = template

    @staticmethod
    def _read_json(path: pathlib.Path) -> dict:
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding='utf-8'))
        except json.JSONDecodeError as e:
            raise corpus.DataError(f'{path} is not valid JSON: {e}') from e

    def _id(self, key: str) -> int:
        text = self.special_tokens[key]
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise corpus.DataError(f'data.tokenizer_path={self.path!r}: {key}={text!r} is not in the vocabulary')
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos; special-token strings in it become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; pad, bos and eos decode to nothing, other special tokens to their text."""
        drop = {self.pad_id, self.bos_id, self.eos_id}
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in drop],
                                skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        """The id of the vocabulary entry `token` (an added token such as '<｜fim▁begin｜>'), None if absent."""
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The checkpoint's chat template rendered for `messages` ([{'role', 'content'}, ...])."""
        if not self.chat_template:
            raise corpus.DataError(f'data.tokenizer_path={self.path!r}: {CONFIG_FILE} has no chat_template')
        return _compiled(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            **self.special_tokens, **kwargs)

    def __reduce__(self):
        # Rebuild from the files, so the tokenizer can cross process boundaries (grain workers).
        return (HFTokenizer, (self.path,))


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compiled(source: str) -> jinja2.Template:
    """The template compiled in a sandbox with transformers' settings, cached by its text."""
    if source not in _TEMPLATES:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        env.filters['tojson'] = _tojson
        env.globals['raise_exception'] = _raise_exception
        env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
