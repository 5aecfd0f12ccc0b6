"""Tokenizer for artifacts: the `tokenizers` library plus the model's chat template (jinja2).

The chat template comes from the artifact, so it is rendered in jinja2's immutable sandbox: a template
can format messages but not reach Python internals (`os.system` through `__globals__`, `__subclasses__`)
or mutate what it is given. A template that tries is refused with `ArtifactError`."""

from __future__ import annotations

import json
import os

from .errors import ArtifactError


class Tokenizer:
    def __init__(self, folder: str) -> None:
        from tokenizers import Tokenizer as _T

        self.tok = _T.from_file(os.path.join(folder, "tokenizer.json"))
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        self.config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        tpl = os.path.join(folder, "chat_template.jinja")
        self.chat_template = open(tpl).read() if os.path.exists(tpl) else self.config.get("chat_template")

    def token_id(self, tok) -> int | None:
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self.tok.token_to_id(tok) if tok else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.config.get("eos_token"))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, tid: int) -> str:
        """One token's text as OpenAI's logprobs show it (special tokens by name)."""
        return self.tok.decode([tid], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(self, messages: str | list[dict[str, str]], system: str | None = None) -> str:
        """A user message (text) or a whole chat ({"role", "content"} dicts) rendered by the model's
        template, ending with the prompt for the assistant's turn. Without a template: the contents, one per line."""
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        if system and not (msgs and msgs[0].get("role") == "system"):
            msgs = [{"role": "system", "content": system}] + msgs
        if not self.chat_template:
            return "\n".join(m["content"] for m in msgs)
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            return env.from_string(self.chat_template).render(
                messages=msgs,
                add_generation_prompt=True,
                bos_token=self.config.get("bos_token", ""),
                eos_token=self.config.get("eos_token", ""),
            )
        except jinja2.exceptions.SecurityError as e:
            raise ArtifactError(
                f"the artifact's chat template tried an unsafe operation ({e}); it is not rendered: use a "
                "trusted template, or pass token ids"
            ) from e
        except jinja2.TemplateError as e:
            raise ArtifactError(f"the artifact's chat template fails to render ({e}): fix the template") from e
