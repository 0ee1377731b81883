"""`lmlab chat`: history, /reset, /system, Ctrl-C stops a reply and the chat goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import lmlab
from lmlab.data.chat import prompt_ids
from lmlab.infer.engine import Engine, SamplingParams
from lmlab.infer.terminal import ChatSession, chat_loop


@pytest.fixture(scope="module")
def lm(chat_model_dir):
    return lmlab.load(chat_model_dir)


def scripted(lines):
    it = iter(lines)

    def read(_prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_turns_render_the_whole_history_and_commands_work(lm):
    greedy = SamplingParams(max_tokens=8, temperature=0)
    with Engine(lm.model, lm.tokenizer) as engine:
        session = ChatSession(engine, greedy, system="你是一个助手")
        submitted = []
        submit = engine.submit
        engine.submit = lambda ids, params: submitted.append(ids) or submit(ids, params)
        shown, notes = [], []
        rc = chat_loop(session, scripted(["你好", "再说一遍", "/system be brief", "hi", "/reset",
                                          "/nope", "again"]),
                       shown.append, notes.append)
    assert rc == 0
    first = Engine(lm.model, lm.tokenizer).generate([submitted[0]], greedy)[0].text
    assert "".join(shown).startswith(first)
    # the second turn's prompt is the whole conversation so far, the reply included
    want = prompt_ids(lm.tokenizer, [{"role": "system", "content": "你是一个助手"},
                                     {"role": "user", "content": "你好"},
                                     {"role": "assistant", "content": first},
                                     {"role": "user", "content": "再说一遍"}])
    assert submitted[1] == want
    # /system starts over with the new system turn; /reset keeps it and forgets the turns
    assert submitted[2] == prompt_ids(lm.tokenizer, [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hi"}])
    assert submitted[3] == prompt_ids(lm.tokenizer, [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "again"}])
    assert any("unknown command '/nope'" in n for n in notes)


def test_ctrl_c_stops_the_reply_frees_the_slot_and_the_chat_goes_on(lm):
    with Engine(lm.model, lm.tokenizer) as engine:
        session = ChatSession(engine, SamplingParams(max_tokens=200, temperature=0,
                                                     stop_ids=()))
        pieces = []

        def write(piece):
            pieces.append(piece)
            if len(pieces) == 3:
                raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

        notes = []
        chat_loop(session, scripted(["tell me", "and then"]), write, notes.append)
        assert "(stopped)" in notes
        deadline = time.time() + 5  # the slot is freed by the engine's thread, just after
        while engine.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0
        assert session.turns[1] == {"role": "assistant", "content": "".join(pieces[:3])}
        assert len(session.turns) == 4  # the chat went on: a second turn was answered


def test_old_turns_are_dropped_to_fit_the_context(lm):
    with Engine(lm.model, lm.tokenizer) as engine:
        session = ChatSession(engine, SamplingParams(max_tokens=20, temperature=0))
        notes = []
        long = "语言模型通过预测下一个词来学习语言的规律。" * 3
        chat_loop(session, scripted([long] * 8), lambda _: None, notes.append)
    assert session.dropped > 0 and any("dropped to fit" in n for n in notes)
    assert len(prompt_ids(lm.tokenizer, session.messages()[:-1])) <= lm.model.max_seq_len


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_the_cli_chats_over_a_pipe_and_ctrl_c_at_the_prompt_leaves_cleanly(chat_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "chat", "--model",
                             str(chat_model_dir), "--max-tokens", "10", "--temperature", "0",
                             "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write("讲个故事\n".encode())
        proc.stdin.flush()
        seen = b""
        deadline = time.time() + 60
        while seen.count(b"> ") < 2 and time.time() < deadline:  # answered, asking again
            seen += os.read(proc.stdout.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"(cut at max_tokens=10)" in err
