"""`lmlab chat`: a conversation with a model in the terminal, through the engine.

Each turn renders the whole conversation with the tokenizer's chat template
(`lmlab.data.chat.prompt_ids`) and streams the reply as the engine produces
it. Commands: `/reset` starts over (the system turn stays), `/system TEXT`
sets the system turn and starts over, `/exit` (or Ctrl-D) leaves. Ctrl-C
during a reply stops that reply (the engine frees its slot at the next step)
and the chat goes on; the part already shown stays in the history.

When the conversation no longer fits the model's context with room for a
reply, the oldest turns are dropped (the system turn is kept) and a note says so.
"""

from __future__ import annotations

from collections.abc import Callable

from lmlab.data.chat import prompt_ids
from lmlab.infer.engine import Engine, SamplingParams
from lmlab.infer.sampling import GenerationError

__all__ = ["ChatSession", "chat_loop"]

HELP = "/reset: new conversation   /system TEXT: set the system turn   /exit: leave (or Ctrl-D)"


class ChatSession:
    """A conversation: its turns, and the engine that answers them."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.turns: list[dict] = []
        self.dropped = 0  # turns dropped to fit the context, in total

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self, system: str | None = ...) -> None:
        if system is not ...:
            self.system = system or None
        self.turns = []

    def _fitted_prompt(self) -> list[int]:
        """The rendered conversation, oldest turns dropped until a reply has room."""
        tok, context = self.engine.tokenizer, self.engine.model.max_seq_len
        ids = prompt_ids(tok, self.messages())
        if context is None:
            return ids
        room = min(self.params.max_tokens or context // 2, context // 2)
        while len(ids) > context - room and len(self.turns) > 1:
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[-1:]
            self.dropped += 2
            ids = prompt_ids(tok, self.messages())
        return ids

    def reply(self, user: str, write: Callable[[str], None]) -> tuple[str, str]:
        """Answer `user`, calling write(piece) as text arrives; (reply, finish reason).
        A KeyboardInterrupt inside write (Ctrl-C) stops the reply: "cancelled"."""
        self.turns.append({"role": "user", "content": user})
        req = self.engine.submit(self._fitted_prompt(), self.params)
        shown = []
        try:
            for ev in req:
                if ev.text:
                    shown.append(ev.text)
                    write(ev.text)
                if ev.finish_reason == "error":
                    raise RuntimeError(ev.error)
        except KeyboardInterrupt:
            req.cancel()
            req.result()
        text = "".join(shown)
        self.turns.append({"role": "assistant", "content": text})
        return text, req.result().finish_reason


def chat_loop(session: ChatSession, read: Callable[[str], str] = input,
              write: Callable[[str], None] = print, note: Callable[[str], None] = print) -> int:
    """The terminal loop: read a line, run a command or answer it. Returns 0 on leaving."""
    note(f"chatting with {session.engine.model_name or 'the model'}; {HELP}")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            note("")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            note("(new conversation)")
            continue
        if line == "/system" or line.startswith("/system "):
            session.reset(line[len("/system"):].strip())
            note(f"(system: {session.system!r}; new conversation)" if session.system
                 else "(no system turn; new conversation)")
            continue
        if line.startswith("/"):
            note(f"unknown command {line.split()[0]!r}; {HELP}")
            continue
        dropped = session.dropped
        try:
            _, reason = session.reply(line, write)
        except GenerationError as e:  # e.g. one message longer than the whole context
            session.turns.pop()
            note(f"(not sent: {e})")
            continue
        write("\n")
        if reason == "cancelled":
            note("(stopped)")
        elif reason == "length":
            note(f"(cut at max_tokens={session.params.max_tokens})")
        if session.dropped > dropped:
            note(f"(the oldest {session.dropped - dropped} turns were dropped to fit the "
                 f"model's context of {session.engine.model.max_seq_len} tokens)")
