"""`kiln chat ARTIFACT`: an interactive multi-turn conversation in the terminal, streamed as it is made.

Commands: /reset forgets the conversation (the system prompt stays), /exit quits; so do Ctrl-D and
Ctrl-C at the prompt. Ctrl-C while the model writes stops that answer and keeps the conversation.
When the conversation no longer fits the artifact's context, the oldest turns are dropped.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

HELP = "/reset clears the conversation, /exit quits (or Ctrl-D)"


def chat_loop(engine: Any, params: Any, system: str | None = None, out: TextIO = sys.stdout) -> int:
    """Read user turns from stdin until /exit or EOF; returns the exit code (0)."""
    from kiln.runtime.serving import Server

    if engine.tokenizer is None:
        print("kiln chat: this artifact has no tokenizer: chat needs text", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"kiln chat ({HELP})", file=sys.stderr)
    head = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = []
    server = Server(engine, max_batch=1)
    try:
        while True:
            try:
                line = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                print(file=out)
                return 0
            cmd = line.strip()
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                history = []
                print("(conversation cleared)", file=out)
                continue
            if cmd.startswith("/"):
                print(f"unknown command {cmd}: {HELP}", file=out)
                continue
            if not cmd:
                continue
            user = {"role": "user", "content": line}
            answer = _answer(server, head, history, user, params, out)
            if answer is not None:
                history += [user, {"role": "assistant", "content": answer}]
    finally:
        server.close()


def _answer(server: Any, head: list, history: list, user: dict, params: Any, out: TextIO) -> str | None:
    """Stream one reply; the oldest turns go while the conversation does not fit."""
    while True:
        try:
            h = server.submit(head + history + [user], params)
            break
        except ValueError as e:
            if not history:
                print(f"kiln chat: {e}", file=out)
                return None
            del history[:2]  # drop the oldest exchange and try again
    try:
        for d in h.deltas():
            out.write(d.text)
            out.flush()
    except KeyboardInterrupt:
        h.cancel()
        h.result()
        out.write(" [stopped]")
    print(file=out)
    return h.completion.text
