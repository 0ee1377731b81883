// lmlab's web chat page.
//
// The conversation lives here, in `chat.history` ({role, content} messages), and goes to
// the server whole with every turn: POST v1/chat/completions with "stream": true. The
// reply comes back as server-sent events, one `data: {json}` per piece of text, with
// `data: [DONE]` last; an event `data: {"error": {...}}` is shown as an error. The Stop
// button aborts the fetch, and a closed connection makes the server cancel the
// generation. Model output is only ever put into the page as text nodes (see
// `renderMarkdown`), so whatever the model writes, `<script>` included, shows as text.
// Settings and the API key are kept in this browser's localStorage, nothing else.
"use strict";

const TEXT = {
  en: {
    newChat: "New chat", settings: "Settings", system: "System prompt",
    temperature: "Temperature", maxTokens: "Max tokens", apiKey: "API key",
    apiKeyHint: "optional; kept in this browser",
    placeholder: "Message — Enter to send, Shift+Enter for a new line",
    send: "Send", stop: "Stop", stopped: "stopped", sources: "Sources", loading: "loading…",
    needKey: "This server needs an API key: enter it under Settings.",
    badKey: "The server refused this API key (401): check it under Settings.",
    noServer: "Cannot reach the server.",
    cutShort: "The connection closed before the reply was complete.",
    usage: (p, c) => `${p} prompt + ${c} reply tokens`,
    speed: (tps) => `${tps} tokens/s`,
    firstToken: (s) => `first token ${s} s`,
  },
  zh: {
    newChat: "新对话", settings: "设置", system: "系统提示词",
    temperature: "温度", maxTokens: "最多生成词元", apiKey: "API 密钥",
    apiKeyHint: "可选；只存在本浏览器",
    placeholder: "输入消息：Enter 发送，Shift+Enter 换行",
    send: "发送", stop: "停止", stopped: "已停止", sources: "来源", loading: "加载中…",
    needKey: "服务器需要 API 密钥：请在“设置”中填写。",
    badKey: "服务器拒绝了这个 API 密钥（401）：请在“设置”中检查。",
    noServer: "无法连接服务器。",
    cutShort: "回复还没结束，连接就断开了。",
    usage: (p, c) => `提示 ${p} + 回复 ${c} 个词元`,
    speed: (tps) => `${tps} 词元/秒`,
    firstToken: (s) => `首词元 ${s} 秒`,
  },
};
const LANG = (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";

function t(key, ...args) {
  const value = TEXT[LANG][key] ?? TEXT.en[key];
  return typeof value === "function" ? value(...args) : value;
}

const $ = (id) => document.getElementById(id);
const STORE = "lmlab.chat.";            // localStorage keys: the settings below, nothing else
const SETTINGS = ["system", "temperature", "max-tokens", "api-key"];
const chat = { history: [], controller: null, model: null };

class ApiError extends Error {}


// ------------------------------------------------------------ rendering model text

/** Build `text` as DOM nodes inside `into`: ``` fences become <pre><code>, `code` inline
 *  becomes <code>, blank lines separate paragraphs. Every piece of text goes in as a text
 *  node, never as HTML; an unclosed fence (a reply still streaming) runs to the end. */
function renderMarkdown(text, into) {
  const nodes = [];
  text.split("```").forEach((part, i) => {
    if (i % 2 === 1) {                   // inside a fence: its first line names the language
      const nl = part.indexOf("\n");
      const code = document.createElement("code");
      code.textContent = (nl < 0 ? part : part.slice(nl + 1)).replace(/\n$/, "");
      const lang = nl < 0 ? "" : part.slice(0, nl).trim();
      if (lang) code.dataset.lang = lang;
      const pre = document.createElement("pre");
      pre.append(code);
      nodes.push(pre);
      return;
    }
    for (const para of part.split(/\n\s*\n/)) {
      if (!para.trim()) continue;
      const p = document.createElement("p");
      appendInlineCode(p, para.replace(/^\n+|\n+$/g, ""));
      nodes.push(p);
    }
  });
  into.replaceChildren(...nodes);
}

function appendInlineCode(p, text) {
  const pieces = text.split("`");
  pieces.forEach((piece, i) => {
    if (i % 2 === 0) p.append(piece);
    else if (i === pieces.length - 1) p.append("`" + piece);   // an unmatched backtick
    else p.append(Object.assign(document.createElement("code"), { textContent: piece }));
  });
}


// ------------------------------------------------------------ the conversation on screen

function addMessage(role, text) {
  const msg = document.createElement("article");
  msg.className = `msg ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  msg.append(content);
  if (role === "assistant") renderMarkdown(text, content);
  else content.textContent = text;
  $("log").append(msg);
  scrollDown(true);
  return msg;
}

function addNote(msg, cls, text) {
  const note = document.createElement("div");
  note.className = cls;
  note.textContent = text;
  msg.append(note);
  return note;
}

/** The passages a --docs server put in the prompt ({n, source, where, text}), as a list. */
function showSources(msg, sources) {
  const box = document.createElement("details");
  box.className = "sources";
  box.open = true;
  const summary = document.createElement("summary");
  summary.textContent = `${t("sources")} (${sources.length})`;
  const list = document.createElement("ol");
  for (const s of sources) {
    const item = document.createElement("li");
    if (Number.isInteger(s.n)) item.value = s.n;   // the [n] the answer cites
    const name = document.createElement("span");
    name.className = "source";
    name.textContent = [s.source, s.where].filter((v) => v != null && v !== "").join(", ");
    const snippet = document.createElement("span");
    snippet.className = "snippet";
    snippet.textContent = String(s.text ?? "");
    item.append(name, " ", snippet);
    list.append(item);
  }
  box.append(summary, list);
  msg.append(box);
}

/** The small line under a reply: token counts, decode speed, time to the first token. */
function showStats(msg, out, stopped) {
  const parts = [];
  if (stopped) parts.push(t("stopped"));
  if (out.usage) parts.push(t("usage", out.usage.prompt_tokens, out.usage.completion_tokens));
  const n = out.usage?.completion_tokens;
  if (n > 1 && out.tLast > out.tFirst)
    parts.push(t("speed", ((n - 1) / ((out.tLast - out.tFirst) / 1000)).toFixed(1)));
  if (out.tFirst !== null) parts.push(t("firstToken", ((out.tFirst - out.t0) / 1000).toFixed(2)));
  if (parts.length) addNote(msg, "stats", parts.join(" · "));
}

function scrollDown(force = false) {
  const el = document.scrollingElement;
  const nearBottom = el.scrollHeight - el.scrollTop - el.clientHeight < 120;
  if (force || nearBottom) el.scrollTop = el.scrollHeight;
}


// ------------------------------------------------------------ talking to the server

function apiUrl(path) {
  return new URL(path, document.baseURI);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** The one-line message of a failed response: OpenAI's {"error": {"message"}} body. */
async function errorMessage(res) {
  if (res.status === 401) return $("api-key").value.trim() ? t("badKey") : t("needKey");
  const body = await res.text();
  try {
    return JSON.parse(body).error.message || `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}: ${body.slice(0, 200)}`;
  }
}

/** The JSON of each server-sent event's `data:` lines, until `data: [DONE]`. */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError(t("cutShort"));
    buffer += value;
    const events = buffer.split(/\r\n\r\n|\n\n|\r\r/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r\n|\r|\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

/** The served model's name into the header (retried while the server is still loading). */
async function loadModel() {
  const label = $("model");
  try {
    const res = await fetch(apiUrl("v1/models"), { headers: headers() });
    if (res.status === 503) {
      label.textContent = t("loading");
      setTimeout(loadModel, 1000);
      return;
    }
    if (!res.ok) throw new ApiError(await errorMessage(res));
    chat.model = (await res.json()).data[0].id;
    label.textContent = chat.model;
    label.title = "";
  } catch (err) {
    label.textContent = "⚠";
    label.title = err instanceof ApiError ? err.message : t("noServer");
  }
}

function requestBody(messages) {
  const body = { model: chat.model ?? "", messages, stream: true,
                 stream_options: { include_usage: true } };
  const temperature = parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) body.temperature = Math.min(Math.max(temperature, 0), 2);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

/** One turn: show the user's message, stream the reply into the page, keep both in the
 *  history. Stopped: the partial reply stays. Failed: the turn leaves the history and its
 *  text goes back into the input box. */
async function send(text) {
  if (!text.trim() || chat.controller) return;
  const controller = new AbortController();
  chat.controller = controller;
  const user = { role: "user", content: text };
  const userMsg = addMessage("user", text);
  const reply = addMessage("assistant", "");
  const content = reply.querySelector(".content");
  const system = $("system").value.trim();
  const messages = [...chat.history, user];
  if (system) messages.unshift({ role: "system", content: system });
  const out = { text: "", usage: null, t0: performance.now(), tFirst: null, tLast: null };
  setBusy(true, reply);
  let stopped = false;
  try {
    if (chat.model === null) await loadModel();
    const res = await fetch(apiUrl("v1/chat/completions"), {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)),
      signal: controller.signal,
    });
    if (!res.ok) throw new ApiError(await errorMessage(res));
    for await (const data of sseData(res.body)) {
      if (data.error) throw new ApiError(data.error.message || JSON.stringify(data.error));
      if (Array.isArray(data.sources) && data.sources.length) showSources(reply, data.sources);
      if (data.usage) out.usage = data.usage;
      const piece = data.choices?.[0]?.delta?.content;
      if (piece) {
        out.tLast = performance.now();
        if (out.tFirst === null) out.tFirst = out.tLast;
        out.text += piece;
        renderMarkdown(out.text, content);
        scrollDown();
      }
    }
    keep(user, out.text);
  } catch (err) {
    if (!reply.isConnected) return;      // New chat pressed meanwhile: this turn is gone
    if (err.name === "AbortError") {
      stopped = true;
      keep(user, out.text);
    } else {
      const message = err instanceof ApiError ? err.message : `${t("noServer")} (${err.message})`;
      addNote(reply, "error", message);
      userMsg.classList.add("failed");
      if (!$("input").value) {
        $("input").value = text;
        growInput();
      }
    }
  } finally {
    if (chat.controller === controller) chat.controller = null;
    if (reply.isConnected) {
      showStats(reply, out, stopped);
      setBusy(false, reply);
    }
  }
}

/** The turn into the history (an empty reply is left out: a chat template refuses it). */
function keep(user, replyText) {
  chat.history.push(user);
  if (replyText) chat.history.push({ role: "assistant", content: replyText });
}

function setBusy(busy, reply) {
  reply.setAttribute("aria-busy", String(busy));
  reply.classList.toggle("streaming", busy);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function newChat() {
  chat.controller?.abort();
  chat.controller = null;
  chat.history = [];
  $("log").replaceChildren();
  $("send").hidden = false;
  $("stop").hidden = true;
  $("input").focus();
}


// ------------------------------------------------------------ wiring

function submitInput() {
  const input = $("input");
  const text = input.value;
  if (!text.trim() || chat.controller) return;
  input.value = "";
  growInput();
  send(text);
}

function growInput() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
}

function setUp() {
  for (const el of document.querySelectorAll("[data-t]")) el.textContent = t(el.dataset.t);
  for (const el of document.querySelectorAll("[data-t-placeholder]"))
    el.placeholder = t(el.dataset.tPlaceholder);
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";

  for (const id of SETTINGS) {
    const el = $(id);
    const saved = localStorage.getItem(STORE + id);
    if (saved !== null) el.value = saved;
    el.addEventListener("change", () => {
      localStorage.setItem(STORE + id, el.value);
      if (id === "api-key") loadModel();
    });
  }

  const input = $("input");
  input.addEventListener("keydown", (e) => {
    // Enter that ends an IME composition (pinyin → 汉字) must not send: isComposing,
    // or keyCode 229 where a browser reports the composition that way
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      submitInput();
    }
  });
  input.addEventListener("input", growInput);
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submitInput(); });
  $("stop").addEventListener("click", () => chat.controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  loadModel();
}

// for tests and the browser console
window.lmlabChat = { chat, renderMarkdown, send, newChat };
setUp();
