"""What `generate` accepts as prompts, and how each form becomes token ids.

Accepted: one string, a list of strings, one list of token ids, a list of token-id lists, one chat
(a list of {"role", "content"} messages) or a list of chats. A bare string is one prompt: iterating it
would make one prompt per character, which is never what a caller means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from .validate import token_ids

Message = dict[str, str]
Prompt = Union[str, Sequence[int], Sequence[Message]]

ROLES = ("system", "user", "assistant", "tool", "developer")


def _is_ids(x: object) -> bool:
    return (
        isinstance(x, Sequence | np.ndarray)
        and not isinstance(x, str)
        and len(x) > 0
        and (
            (isinstance(x, list) and set(map(type, x)) <= {int})  # the common case, in bulk
            or all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in x)
        )
    )


def _is_chat(x: object) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def as_prompt_list(prompts: Any) -> list[Prompt]:
    """Normalize one prompt or a batch of prompts (any form above) into a list of single prompts."""
    if isinstance(prompts, str) or _is_ids(prompts) or _is_chat(prompts):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a string, token ids, chat messages, or a list of those; got {type(prompts).__name__}"
        )
    out: list[Prompt] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str) or _is_ids(p) or _is_chat(p):
            out.append(p)
        elif isinstance(p, Sequence) and len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give text, at least one token id, or at least one message")
        else:
            raise TypeError(
                f"prompt {i} is {type(p).__name__} {str(p)[:60]!r}: give a string, a list of token ids, "
                "or a list of {'role', 'content'} messages"
            )
    return out


def check_messages(messages: Sequence[Any]) -> list[Message]:
    """Each message is {"role": one of ROLES, "content": text}; errors name the message at fault."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {str(m)[:80]!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}: use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be text, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def encode(tokenizer: Any, prompt: Prompt, chat: bool = False, vocab: int | None = None) -> list[int]:
    """One prompt -> token ids. Text goes through the chat template when `chat`; messages always do."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this artifact has no tokenizer: pass token ids instead of text")
        return tokenizer.encode(tokenizer.apply_chat_template(prompt) if chat else prompt)
    if _is_chat(prompt):
        if tokenizer is None:
            raise ValueError("this artifact has no tokenizer: chat messages need one; pass token ids instead")
        return tokenizer.encode(tokenizer.apply_chat_template(check_messages(prompt)))
    if isinstance(prompt, Sequence | np.ndarray) and len(prompt) == 0:
        return []  # the engine refuses an empty prompt with its position in the batch
    if not isinstance(prompt, Sequence | np.ndarray) or isinstance(prompt, bytes):
        raise TypeError(f"a prompt must be text, token ids or chat messages, got {str(prompt)[:60]!r}")
    if vocab is not None:
        return token_ids(prompt, vocab)  # each an int in [0, vocab), or an error naming the first that is not
    if not _is_ids(prompt):
        raise TypeError(f"a prompt must be text, token ids or chat messages, got {str(prompt)[:60]!r}")
    return [int(t) for t in prompt]  # type: ignore[arg-type]  # _is_ids checked every element
