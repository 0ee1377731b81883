"""The web chat page (src/lmlab/serve/static/) in a real browser against a real server.

Debian's chromium, driven by playwright (never `playwright install`: it downloads a
browser), opens the page that `lmlab.serve.server.run_server` serves at `/` for a tiny
model: a Chinese message streams a reply that grows on screen, Stop ends it and the
server's running batch goes back to 0 (its Prometheus gauge), the next turn sends the
whole history and shows the server's usage, which equals the tokenizer's count, and New
chat clears it. A server with an API key and --docs: its 401 asks for the key, then the
answer lists its sources. Replies stubbed in the browser (`page.route`) check what a
server cannot be made to send: model text full of HTML (and sources named in HTML) shows
as text, an error event mid-stream shows its message. A screenshot of the conversation
goes to the test's tmp_path, and to docs/images/webchat.png with LMLAB_SCREENSHOT=1.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import running_server

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("webchat"),  # one worker: one server, one browser
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at "
                       "/usr/bin/chromium: apt-get install chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")
prom_parser = pytest.importorskip("prometheus_client.parser")

DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "webchat.png"
QUESTION = "你好！请用中文介绍一下语言模型。"


def wait_for(check, timeout: float, what: str, every: float = 0.05):
    """check()'s first truthy value within `timeout` seconds, else a failure naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def running_rows(base: str) -> float:
    """The server's running-batch gauge, read from /metrics."""
    status, text = get(base + "/metrics")
    assert status == 200, f"/metrics answered {status}"
    gauges = {f.name: f for f in prom_parser.text_string_to_metric_families(text)
              if f.type == "gauge" and "running" in f.name}
    assert gauges, f"no running-batch gauge in /metrics: {text[:500]}"
    (family,) = gauges.values()
    return sum(s.value for s in family.samples)


@pytest.fixture(scope="module")
def server(long_chat_model_dir):
    with running_server(long_chat_model_dir, long_chat_model_dir.parent / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@contextmanager
def chat_page(browser, base: str):
    """The chat page in a fresh Chinese-language browser context (its own localStorage)."""
    context = browser.new_context(locale="zh-CN", viewport={"width": 900, "height": 720})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(base + "/")
    pg.wait_for_selector("#model:not(:empty)")  # (not wait_for_function: the CSP forbids eval)
    yield pg
    context.close()
    assert not errors, f"the page raised: {errors}"


@pytest.fixture
def page(browser, server):
    with chat_page(browser, server) as pg:
        yield pg


def reply_state(pg) -> dict:
    return pg.evaluate("""() => {
        const all = document.querySelectorAll('.msg.assistant');
        const last = all[all.length - 1];
        return {n: all.length, text: last ? last.querySelector('.content').textContent : '',
                streaming: !!last && last.classList.contains('streaming'),
                notes: [...(last ? last.querySelectorAll('.stats, .error') : [])]
                       .map(e => e.textContent)};
    }""")


def set_setting(pg, selector: str, value: str) -> None:
    pg.locator("#settings summary").click()
    pg.fill(selector, value)
    pg.dispatch_event(selector, "change")
    pg.locator("#settings summary").click()


def test_stream_stop_history_new_chat(page, server, long_chat_model_dir, tmp_path):
    from lmlab.data.chat import prompt_ids
    from lmlab.tokenizer import Tokenizer

    assert page.text_content("#model") == long_chat_model_dir.name
    assert page.text_content("#send") == "发送"  # the page follows the browser's language
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    set_setting(page, "#temperature", "0")
    set_setting(page, "#max-tokens", "4000")

    page.fill("#input", QUESTION)
    page.press("#input", "Enter")
    lengths: set[int] = set()

    def grown():
        state = reply_state(page)
        assert state["streaming"], f"the reply ended by itself before it was seen growing: {state}"
        if state["text"]:
            lengths.add(len(state["text"]))
        return len(lengths) >= 3

    wait_for(grown, 30, "the streamed reply to grow")

    page.click("#stop")
    page.wait_for_selector(".msg.assistant.streaming", state="detached", timeout=5000)
    stopped = reply_state(page)
    wait_for(lambda: running_rows(server) == 0, 5, "the server to cancel the stopped reply")
    assert "已停止" in stopped["notes"][0] and page.is_visible("#send")
    time.sleep(0.3)
    assert reply_state(page)["text"] == stopped["text"], "the reply grew after Stop"
    history = page.evaluate("window.lmlabChat.chat.history")
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"]
    assert history[0]["content"] == QUESTION
    assert bodies[0]["stream"] is True and bodies[0]["max_tokens"] == 4000
    assert bodies[0]["temperature"] == 0 and bodies[0]["model"] == long_chat_model_dir.name

    # the next turn sends the whole conversation, the stopped reply included, and shows the
    # server's usage: the prompt's tokens as the tokenizer counts them
    set_setting(page, "#max-tokens", "5")
    page.fill("#input", "再说一遍")
    page.click("#send")
    wait_for(lambda: not reply_state(page)["streaming"] and reply_state(page)["n"] == 2, 20,
             "the second reply to finish")
    sent = bodies[1]["messages"]
    assert sent == history + [{"role": "user", "content": "再说一遍"}]
    n_prompt = len(prompt_ids(Tokenizer.load(long_chat_model_dir), sent))
    notes = reply_state(page)["notes"]
    assert f"提示 {n_prompt} + 回复 5 个词元" in notes[0], notes
    page.screenshot(path=str(tmp_path / "webchat.png"))
    if os.environ.get("LMLAB_SCREENSHOT") == "1":
        page.screenshot(path=str(DOCS_SHOT))

    # settings survive a reload; the conversation does not, and New chat clears it
    assert page.evaluate("window.lmlabChat.chat.history")[:3] == sent
    page.click("#new-chat")
    assert page.evaluate("window.lmlabChat.chat.history") == []
    assert page.locator("#log > *").count() == 0
    page.reload()
    assert page.input_value("#max-tokens") == "5" and page.input_value("#temperature") == "0"
    keys = page.evaluate("Object.keys(localStorage)")
    assert keys and all(k.startswith("lmlab.chat.") for k in keys), keys


INJECTION = ('<img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script>\n\n'
             'say `<b>bold</b>`:\n'
             '```html\n<iframe src="javascript:window.__pwned=3"></iframe>\n```')


def sse(*events) -> str:
    """A streamed reply's body: one server-sent event per JSON object, then [DONE]."""
    data = [json.dumps(e, ensure_ascii=False) for e in events] + ["[DONE]"]
    return "".join(f"data: {d}\n\n" for d in data)


def chunk(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text},
                                                            "finish_reason": None}]}


def stub_reply(page, status: int, body: str, content_type="text/event-stream") -> None:
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=status, body=body, content_type=content_type))


def test_model_text_is_never_html(page):
    # the renderer alone: HTML in model text stays text; ``` and ` become code elements
    out = page.evaluate("""(text) => {
        const box = document.createElement('div');
        window.lmlabChat.renderMarkdown(text, box);
        document.body.append(box);
        return {text: box.textContent, tags: [...box.querySelectorAll('*')].map(e => e.tagName),
                lang: box.querySelector('pre code').dataset.lang};
    }""", INJECTION)
    assert out["tags"] == ["P", "P", "CODE", "PRE", "CODE"] and out["lang"] == "html"
    assert '<img src=x onerror="window.__pwned=1">' in out["text"] and "<b>bold</b>" in out["text"]

    # the same through the streaming path, split mid-tag, with sources carrying HTML too
    sources = [{"n": 3, "source": "notes/<img src=x onerror=window.__pwned=4>.md",
                "where": "lines 1-2", "text": "北京的天气很好。", "score": 1.5}]
    pieces = [INJECTION[i:i + 7] for i in range(0, len(INJECTION), 7)]
    stub_reply(page, 200, sse({**chunk(""), "sources": sources}, *map(chunk, pieces),
                              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 30,
                                                        "total_tokens": 39}}))
    page.fill("#input", "测试")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .stats")
    reply = page.locator(".msg.assistant")
    assert reply.locator(".content").text_content().startswith(INJECTION.split(" <")[0])
    assert reply.locator(".content :is(img, script, iframe), .sources img").count() == 0
    assert reply.locator(".sources .source").text_content() == sources[0]["source"] + ", lines 1-2"
    assert reply.locator(".sources li").get_attribute("value") == "3"  # the [3] the answer cites
    assert "提示 9 + 回复 30 个词元" in reply.locator(".stats").text_content()
    # (the page's CSP would block inline handlers anyway: the element counts are the test)
    assert page.evaluate("window.__pwned") is None


def test_error_event_mid_stream(page):
    # its message shows, the turn leaves the history and its text goes back to the input box
    error = {"error": {"message": "the engine failed", "type": "server_error", "param": None,
                       "code": None}}
    stub_reply(page, 200, sse(chunk("半句"), error))
    page.fill("#input", "第一问")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .error")
    assert page.text_content(".msg.assistant .error") == "the engine failed"
    assert page.text_content(".msg.assistant .content") == "半句"
    assert page.evaluate("window.lmlabChat.chat.history") == []
    assert page.input_value("#input") == "第一问" and page.locator(".msg.user.failed").count() == 1


def test_api_key_and_sources_from_a_docs_server(browser, chat_model_dir, tmp_path):
    """A server with an API key and --docs: without the key the page says to enter one (the
    server's 401); with it, the answer lists the passages the server put in the prompt."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "weather.md").write_text("# 天气\n\n北京、上海和深圳的天气今天都很好，适合出门散步。\n",
                                     encoding="utf-8")
    (docs / "python.txt").write_text('Python reads a file with open(path, encoding="utf-8").\n')
    with running_server(chat_model_dir, tmp_path / "server.log", api_key="sk-test-key",
                        docs=docs) as base, chat_page(browser, base) as page:
        assert page.text_content("#model") == "⚠"  # /v1/models answered 401
        set_setting(page, "#max-tokens", "4")
        page.fill("#input", "北京的天气怎么样？")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .error")
        assert "API 密钥" in page.text_content(".msg.assistant .error")

        set_setting(page, "#api-key", "sk-test-key")  # the model's name is fetched again
        page.wait_for_selector(f"#model:text-is('{chat_model_dir.name}')")
        with page.expect_request("**/v1/chat/completions") as sent:
            page.click("#send")  # the failed question went back into the box
        assert sent.value.headers["authorization"] == "Bearer sk-test-key"
        reply = page.locator(".msg.assistant").last
        reply.locator(".stats").wait_for()
        assert reply.locator(".sources .source").first.text_content().startswith("weather.md")
        assert "北京" in reply.locator(".sources .snippet").first.text_content()
        assert page.evaluate("window.lmlabChat.chat.history")[0]["content"] == "北京的天气怎么样？"


def test_enter_sends_but_not_while_composing(page):
    stub_reply(page, 200, sse(chunk("好的")))
    page.fill("#input", "拼音")
    # an IME's Enter that picks the characters must not send
    page.evaluate("""() => document.getElementById('input').dispatchEvent(new KeyboardEvent(
        'keydown', {key: 'Enter', isComposing: true, bubbles: true, cancelable: true}))""")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("第二行")
    assert page.locator(".msg").count() == 0 and page.input_value("#input") == "拼音\n第二行"
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .stats")
    assert page.text_content(".msg.user") == "拼音\n第二行"
    assert page.text_content(".msg.assistant .content") == "好的"
