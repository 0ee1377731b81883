"""The engine: every generation in lmlab, one batched decode loop with rows that come and go.

`generate`, `lmlab chat`, the server and evaluation all submit requests here.
Each request has its own prompt and its own sampling settings; the engine
runs them together (continuous batching, as in Orca, Yu et al. 2022, and
vLLM):

1. a step first admits waiting requests into free slots of the batch: each is
   prefilled alone (one forward pass over its prompt fills its slot of the KV
   cache) and its first token is sampled at once, so time to first token does
   not wait for the others to finish;
2. then one decode step feeds every running row its last token, all rows in
   one forward pass, each at its own position (`model.decode_slots`);
3. rows that finished (a stop id, a stop string, their token budget, a cancel)
   leave the batch before the next step: their slot is free for the next
   request, and they are no longer computed.

So a long answer does not hold short ones back, and the batch stays full
while requests keep arriving. The memory of a slot is its KV cache: per
position, 2 × n_layer × n_kv_head × head_dim numbers (`SlotCache`).

Per row the engine keeps its sampling settings (`sample_rows` applies them as
tensors, one entry per row), its random stream (a seeded request draws from
its own generator, so it gives the same text alone and in any batch), a
`TextStreamer` that never splits a UTF-8 character, and a hold-back buffer for
stop strings: text that could be the start of a stop string is kept until it
is known not to be one, so a stop string never reaches the client.

Kinds without the slot protocol (the recurrent models, the n-gram, an
encoder–decoder conditioned on its sources) run in lockstep: the waiting
requests start together, left-padded into one decode state
(`model.new_decode_state(batch, max_len, pad)`), row i being the i-th
submitted, and the next group starts when all of them have finished.

Threads: `start()` runs the loop in a background thread (the server's way);
`step()` runs one iteration in the caller's thread (`generate`'s way).
`submit` and `Request.cancel` are thread-safe; events reach a request's
`on_event` callback, or its queue, in order, from the engine's thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lmlab.infer.sampling import GenerationError, check_sampling_args, penalize_repeats, sample_rows
from lmlab.model import device_of, require_causal_lm

__all__ = ["Engine", "SamplingParams", "Request", "Event", "Completion", "TokenLogprob",
           "QueueFull", "MAX_TOP_LOGPROBS"]

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
FIRST_CACHE_LEN = 256  # a SlotCache starts this long (or as long as the first request needs)


@dataclass
class SamplingParams:
    """How one request is decoded. See `lmlab.infer.sampling` for what each setting does."""

    max_tokens: int | None = 256  # None: until a stop, or the model's context is full
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # CTRL's θ over the prompt's and the answer's ids
    seed: int | None = None  # the same seed gives the same tokens, alone or in a batch
    stop: Sequence[str] = ()  # stop strings: generation ends before them, never shown
    stop_ids: Sequence[int] | None = None  # None: the tokenizer's (end of text / of turn)
    logprobs: bool = False  # log-probabilities of the chosen ids (the model's, unfiltered)
    top_logprobs: int = 0  # and of the most likely alternatives, 0..20

    def check(self) -> None:
        """GenerationError naming the first setting that cannot be used."""
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise GenerationError(f"repetition_penalty must be > 0 (1 = off), got "
                                  f"{self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise GenerationError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got "
                                  f"{self.top_logprobs}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop must be a list of non-empty strings")


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # tokenizer.decode([token_id]); "" without a tokenizer
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, token, logprob)


@dataclass
class Event:
    """One step of one request."""

    text: str  # new printable text ("" while held back)
    token_ids: list[int]  # chosen this step; a stop id is here, never in the text
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # then "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class QueueFull(RuntimeError):
    """`submit` while `max_queue` requests already wait."""


class Request:
    """A submitted generation: iterate it for its Events, or call `result()`.

    Its decode-side fields are touched by the engine's thread only."""

    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams, budget: int,
                 stop_ids: set[int], tokenizer, vocab_size: int, device,
                 on_event: Callable[[Event], None] | None, wake: Callable[[], None]):
        self.id, self.prompt_ids, self.params = rid, prompt_ids, params
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.finish_reason: str | None = None
        self.t_submit, self.t_first_token, self.t_finish = time.perf_counter(), None, None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs else None
        self.budget, self.stop_ids, self.tokenizer = budget, stop_ids, tokenizer
        self._text: list[str] = []
        self._on_event, self._wake = on_event, wake
        self._events: queue.SimpleQueue | None = None if on_event else queue.SimpleQueue()
        self._done = threading.Event()
        self.cancelled = False
        self._streamer = None
        if tokenizer is not None:
            from lmlab.infer.generate import TextStreamer

            self._streamer = TextStreamer(tokenizer)
        self._held = ""  # text that may be the start of a stop string
        self._rng = random.Random(params.seed) if params.seed is not None else None
        self._seen = None  # the ids the repetition penalty applies to
        if params.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._seen[torch.tensor(prompt_ids, device=device)] = True
        self.state = None  # a kind without slots: its own decode state

    # ------------------------------------------------ the caller's side

    def cancel(self) -> None:
        """Stop it: its slot is freed at the engine's next step (then a "cancelled" event)."""
        if not self._done.is_set():
            self.cancelled = True
            self._wake()

    def __iter__(self) -> Iterator[Event]:
        if self._events is None:
            raise RuntimeError("this request's events go to its on_event callback")
        while True:
            ev = self._events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """The whole completion, once it has finished (TimeoutError after `timeout` s)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished after {timeout} s")
        return Completion("".join(self._text), list(self.token_ids), self.logprobs,
                          self.finish_reason, self.prompt_tokens, self.completion_tokens)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # ------------------------------------------------ the engine's side

    def uniform(self) -> float:
        """This row's next random number in [0, 1): its own stream when seeded, else torch's."""
        return self._rng.random() if self._rng is not None else float(torch.rand((),
                                                                                 dtype=torch.float64))

    def add(self, token: int, logprob: TokenLogprob | None) -> None:
        """The token chosen for this row this step: update the text, emit, maybe finish."""
        if self.t_first_token is None:
            self.t_first_token = time.perf_counter()
        self.token_ids.append(token)
        self.completion_tokens += 1
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if self._seen is not None:
            self._seen[token] = True
        finish = None
        if token in self.stop_ids:
            text, finish = self._tail(), "stop"
        else:
            text, hit = self._hold_back(self._streamer.put(token) if self._streamer else "")
            if hit:
                finish = "stop"
            elif self.completion_tokens >= self.budget:
                text, finish = text + self._tail(), "length"
        self._emit(Event(text, [token], [logprob] if logprob is not None else None, finish))

    def finish(self, reason: str, error: str | None = None) -> None:
        """End it without a new token (cancelled, or an error)."""
        self._emit(Event("", [], None, reason, error))

    def _hold_back(self, piece: str) -> tuple[str, bool]:
        """(text that may be shown now, whether a stop string was reached)."""
        stops = self.params.stop
        buf = self._held + piece
        if not stops:
            return buf, False
        hits = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[:min(hits)], True
        keep = max((n for s in stops for n in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:n])), default=0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _tail(self) -> str:
        """What is held back, at the end (a stop string inside it still cuts it)."""
        text, _ = self._hold_back(self._streamer.flush() if self._streamer else "")
        text, self._held = text + self._held, ""
        return text

    def _emit(self, ev: Event) -> None:
        if ev.text:
            self._text.append(ev.text)
        if ev.finish_reason is not None:
            self.finish_reason, self.t_finish = ev.finish_reason, time.perf_counter()
        try:
            if self._on_event is not None:
                self._on_event(ev)
            else:
                self._events.put(ev)
        finally:
            if ev.finish_reason is not None:
                self._done.set()


class Engine:
    """Runs requests in one batch of up to `max_batch` rows; `max_queue` more may wait."""

    def __init__(self, model: nn.Module, tokenizer=None, *, max_batch: int = 8,
                 max_queue: int = 256, model_name: str | None = None):
        if not hasattr(model, "decode_step"):
            hint = ("it is a classifier: `lmlab classify --model DIR --input FILE`"
                    if getattr(model, "labels", None) is not None else "it has no decode_step")
            raise GenerationError(f"model kind {getattr(model, 'kind', '?')!r} does not "
                                  f"generate text; {hint}")
        require_causal_lm(model, "generate")
        if max_batch < 1 or max_queue < 0:
            raise GenerationError(f"max_batch must be >= 1 and max_queue >= 0, got "
                                  f"{max_batch}, {max_queue}")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = device_of(model)
        self.slotted = all(hasattr(model, m) for m in ("new_slots", "prefill_slot", "decode_slots"))
        self._slots = None  # made at the first request, as long as it needs
        self._state, self._group = None, []  # lockstep: the group's decode state and rows
        self._running: list[Request] = []  # row i is in slot i
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.tokens_generated = 0
        self.requests_finished = 0
        self._default_stops = set(stop_ids_of(tokenizer))

    # ------------------------------------------------ submitting

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a request; GenerationError at once if it cannot run, QueueFull if full."""
        params = params or SamplingParams()
        params.check()
        if params.top_k is not None and params.top_k > self.model.vocab_size:
            params = dataclasses.replace(params, top_k=None)  # keeps every id anyway
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer: give the engine one")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError("a text prompt needs a tokenizer: give the engine one")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        budget = self._budget(ids, params.max_tokens)
        stops = self._default_stops if params.stop_ids is None else set(params.stop_ids)
        req = Request(f"{next(self._ids)}", ids, params, budget, stops, self.tokenizer,
                      self.model.vocab_size, self.device, on_event, self._wake)
        with self._cv:
            if self._closed:
                raise GenerationError("the engine is closed")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._running)):
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue="
                                f"{self.max_queue}); try again later")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def _budget(self, ids: list[int], max_tokens: int | None) -> int:
        """How many tokens this prompt may get: max_tokens, cut to what the context leaves."""
        if not ids:
            raise GenerationError("empty prompt: give at least one token (e.g. the EOS id, "
                                  "which starts a new document)")
        context = self.model.max_seq_len  # None: no limit (a recurrent model)
        if context is not None and len(ids) > context:
            raise GenerationError(f"prompt of {len(ids)} tokens is longer than the model's "
                                  f"context (max_seq_len={context}); shorten it")
        if min(ids) < 0 or max(ids) >= self.model.vocab_size:
            raise GenerationError(f"prompt has token ids outside [0, {self.model.vocab_size})")
        if context is None:
            if max_tokens is None:
                raise GenerationError("max_tokens=None needs a model with a context limit; "
                                      "give a number")
            return max_tokens
        room = context - len(ids) + 1  # the last new token is never fed back
        return room if max_tokens is None else min(max_tokens, room)

    # ------------------------------------------------ running

    def start(self) -> "Engine":
        """Run the scheduling loop in a background thread until `close()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmlab-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; every unfinished request ends "cancelled"."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for req in [*self._running, *self._waiting]:
            req.finish("cancelled")
        self._running, self._waiting = [], deque()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._running:
                    self._cv.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # the requests in flight fail; the engine keeps serving
                logger.exception("engine step failed")
                for req in self._running:
                    req.finish("error", f"{type(e).__name__}: {e}")
                self.requests_finished += len(self._running)
                self._running = []
                self._slots = None

    @torch.inference_mode()
    def warm_up(self, budget_s: float = 20.0, steps: int = 14, prompt_len: int = 24) -> int:
        """Run dummy decode steps at every batch size 1..max_batch before any request, so
        the fast paths (`lmlab.model.fastpath`) settle their per-shape timing here and not
        in the first users' steps. Each batch size runs `steps` steps with equal row
        lengths and `steps` with unequal ones (the masked attention), from prompts of about
        `prompt_len` tokens; it stops once `budget_s` seconds are spent. Returns the batch
        sizes warmed. Only for slot kinds, and only before the first request."""
        if not self.slotted or self._slots is not None or self._thread is not None:
            return 0
        room = self.model.max_seq_len or FIRST_CACHE_LEN
        prompt_len = max(1, min(prompt_len, room - steps - self.max_batch - 2))
        if prompt_len + steps + self.max_batch + 2 > room:
            return 0
        deadline = time.monotonic() + budget_s
        gen = torch.Generator().manual_seed(0)
        vocab = self.model.vocab_size
        warmed = 0
        for n in range(1, self.max_batch + 1):
            for ragged in (False, True) if n > 1 else (False,):
                slots = self.model.new_slots(n, min(room, FIRST_CACHE_LEN))
                for i in range(n):
                    length = prompt_len + (i if ragged else 0)
                    ids = torch.randint(0, vocab, (length,), generator=gen).to(self.device)
                    self.model.prefill_slot(ids, slots, i)
                ids = torch.zeros(n, dtype=torch.long, device=self.device)
                for _ in range(steps):
                    self.model.decode_slots(ids, slots)
                if time.monotonic() > deadline:
                    return warmed + 1
            warmed += 1
        return warmed

    def stats(self) -> dict:
        return {"queue_depth": len(self._waiting), "running": len(self._running),
                "max_batch": self.max_batch, "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished}

    @torch.inference_mode()
    def step(self) -> bool:
        """One token for every request: cancelled rows leave, the running rows decode one
        step together, then waiting requests take the free slots (prefill, first token).
        True while requests remain."""
        with self._cv:
            for req in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(req)
                req.finish("cancelled")
                self.requests_finished += 1
        self._leave([i for i, r in enumerate(self._running) if r.cancelled], "cancelled")
        if self._running:
            self._decode() if self.slotted else self._step_group()
        with self._cv:
            free = self.max_batch - len(self._running) if self.slotted or not self._running else 0
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        if self.slotted:
            for req in admitted:
                self._prefill(req)
        elif admitted:
            self._start_group(admitted)
        return bool(self._running or self._waiting)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Every prompt's completion, batched (in this thread unless the engine was started)."""
        many = params if isinstance(params, Sequence) else [params] * len(prompts)
        pending = list(zip(prompts, many))
        reqs: list[Request] = []
        while pending or not all(r.done for r in reqs):
            while pending:
                try:
                    reqs.append(self.submit(*pending[0]))
                    pending.pop(0)
                except QueueFull:
                    break
            if self._thread is None:
                self.step()
            elif pending:
                reqs[-1].result()
            else:
                break
        return [r.result() for r in reqs]

    # ------------------------------------------------ one step

    def _prefill(self, req: Request) -> None:
        ids = torch.tensor(req.prompt_ids, device=self.device)
        need = len(req.prompt_ids) + req.budget - 1  # positions that go through the model
        slot = len(self._running)
        if self._slots is None:
            self._slots = self.model.new_slots(self.max_batch, max(need, min(
                FIRST_CACHE_LEN, self.model.max_seq_len)))
        self._slots.reserve(need)
        logits = self.model.prefill_slot(ids, self._slots, slot)
        self._running.append(req)
        self._choose([req], logits)
        self._leave([slot] if req.done else [], None)

    def _decode(self) -> None:
        rows = self._running
        ids = torch.tensor([r.token_ids[-1] for r in rows], device=self.device)
        self._choose(rows, self.model.decode_slots(ids, self._slots))
        self._leave([i for i, r in enumerate(rows) if r.done], None)

    def _start_group(self, reqs: list[Request]) -> None:
        """Lockstep (a kind without slots): these requests start together, left-padded."""
        longest = max(len(r.prompt_ids) for r in reqs)
        context = self.model.max_seq_len
        for r in reqs:  # the rows share positions: the longest prompt bounds them all
            r.budget = r.budget if context is None else min(r.budget, context - longest + 1)
        pads = [longest - len(r.prompt_ids) for r in reqs]
        ids = torch.tensor([[0] * p + r.prompt_ids for p, r in zip(pads, reqs)],
                           device=self.device)
        pad = torch.tensor(pads, device=self.device) if any(pads) else None
        self._state = self.model.new_decode_state(
            len(reqs), longest + max(r.budget for r in reqs) - 1, pad=pad)
        self._group = reqs
        self._running = list(reqs)
        self._choose(reqs, self.model.decode_step(ids, self._state))
        self._running = [r for r in reqs if not r.done]
        self.requests_finished += len(reqs) - len(self._running)

    def _step_group(self) -> None:
        # finished rows still go through the model: their row of the state is not removable
        ids = torch.tensor([[r.token_ids[-1]] for r in self._group], device=self.device)
        logits = self.model.decode_step(ids, self._state)
        alive = [j for j, r in enumerate(self._group) if not r.done]
        self._choose([self._group[j] for j in alive], logits[alive])
        self._running = [r for r in self._running if not r.done]
        self.requests_finished += len(alive) - len(self._running)

    def _choose(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Sample each row's token from its row of logits and hand it over."""
        logp = None
        if any(r.params.logprobs for r in rows):
            logp = torch.log_softmax(logits.float(), dim=-1)
        penal = [j for j, r in enumerate(rows) if r._seen is not None]
        if penal:
            idx = torch.tensor(penal, device=logits.device)
            logits = logits.index_copy(0, idx, penalize_repeats(
                logits[idx], torch.stack([rows[j]._seen for j in penal]),
                torch.tensor([rows[j].params.repetition_penalty for j in penal],
                             device=logits.device)))
        if all(r.params.temperature == 0 for r in rows):
            tokens = logits.argmax(dim=-1).tolist()
        else:
            p = [r.params for r in rows]
            dev = logits.device
            tokens = sample_rows(
                logits, torch.tensor([q.temperature for q in p], device=dev),
                torch.tensor([r.uniform() if q.temperature else 0.0 for r, q in zip(rows, p)],
                             dtype=torch.float64, device=dev),
                top_k=(torch.tensor([q.top_k or 0 for q in p], device=dev)
                       if any(q.top_k for q in p) else None),
                top_p=(torch.tensor([q.top_p or 1.0 for q in p], device=dev)
                       if any(q.top_p for q in p) else None)).tolist()
        self.tokens_generated += len(rows)
        for j, (req, tok) in enumerate(zip(rows, tokens)):
            req.add(tok, self._logprob(logp[j], tok, req.params.top_logprobs)
                    if logp is not None and req.params.logprobs else None)

    def _logprob(self, logp: torch.Tensor, token: int, top: int) -> TokenLogprob:
        best = []
        if top:
            values, ids = logp.topk(top)
            best = [(i, self._piece(i), v) for i, v in zip(ids.tolist(), values.tolist())]
        return TokenLogprob(token, self._piece(token), float(logp[token]), best)

    def _piece(self, token: int) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode([token])

    def _leave(self, rows: list[int], reason: str | None) -> None:
        """Running rows `rows` leave the batch (finishing them with `reason` unless done);
        the last row moves into each freed slot, so rows 0..n-1 stay the running ones."""
        for i in sorted(rows, reverse=True):
            req = self._running[i]
            if reason is not None:
                req.finish(reason)
            self.requests_finished += 1
            last = len(self._running) - 1
            if self.slotted:
                self._slots.move(last, i)
                self._slots.lens[last] = 0
                self._running[i] = self._running[last]
            self._running.pop(i if not self.slotted else last)


def stop_ids_of(tokenizer) -> list[int]:
    """Every id the tokenizer's model ends a text or a turn with (an imported model's own)."""
    if tokenizer is None:
        return []
    stops = getattr(tokenizer, "stop_ids", None)
    if stops:
        return list(stops)
    return [] if tokenizer.eos_id is None else [tokenizer.eos_id]
