"""lm-evaluation-harness on lmlab models: `LmlabLM` and `run_harness`.

`LmlabLM` is lm-eval's `LM` (through its `TemplateLM`, which does the
context/continuation tokenization) on an lmlab model directory:

- `loglikelihood` — Σ log p(continuation | context) and whether the
  continuation is the greedy one. The pair is tokenized exactly as lm-eval's
  Hugging Face backend (`HFLM`) does it, by `TemplateLM._encode_pair`: trailing
  spaces of the context move to the continuation, `context + continuation` and
  `context` are encoded separately, and the continuation is the tokens of the
  whole past the length of the context's encoding. An empty context is the
  prefix token. The model reads `(context + continuation)[-(window+1):][:-1]`,
  so a context longer than the window keeps its rightmost tokens, and scores
  the continuation's positions only.
- `loglikelihood_rolling` — the whole text's log-likelihood in windows of
  `max_seq_len` tokens, as lm-eval's `get_rolling_token_windows` cuts them
  (context_len 1, disjoint): the first window is the prefix token and the first
  `max_seq_len − 1` tokens, each later window predicts the next `max_seq_len`
  tokens from the token before them, and the last one is given a full window
  of context. Each token is predicted once.
- `generate_until` — through lmlab's one generation loop (`lmlab.infer.generate`),
  greedy unless `do_sample`, at most `max_gen_toks` new tokens, stopping at the
  model's stop ids and as soon as the text holds one of the `until` strings
  (the text is cut before it). The context keeps its rightmost
  `max_seq_len − max_gen_toks` tokens, as HFLM does.

Scoring is one forward pass per batch to the final hidden states
(`model(ids, return_hidden=True)`), then the output layer on the continuation
positions only, a few thousand rows at a time: their log-softmax (fp32) gives
the log-probabilities and their argmax the greedy check, and the logits of
context positions are never made. (lmlab's `sequence_logprobs` gives the same
sums, tested, but no argmax: the greedy check would cost a second pass.) A model
kind without `return_hidden` is scored from its full logits (`model(ids)`),
the kind protocol's forward. Requests are batched longest first and padded on
the right, which a causal model needs no mask for: a pad only comes after the
positions that count (its targets are −100).

The prefix token (what an empty context, and the first window of a rolling
text, is conditioned on): BOS where the tokenizer itself puts BOS in front of
every text (an imported LLaMA's), else lmlab's "start of a new document",
EOS, which is what lmlab's pretraining puts between documents (HFLM would take
lmlab's `<|bos|>`, a token lmlab's models never see in training; pass
`prefix_token_id` to either to choose).

`run_harness(model_dir, tasks)` runs local task YAML files through lm-eval's
`simple_evaluate` and returns {task: {metric: value}}. A task's data is read
from local files only (`dataset_path: json` / `csv` / `parquet` / `text` /
`arrow`, or a local directory, with `data_files` — under `dataset_kwargs`, as
lm-eval writes it, or at the top level); a relative data file is looked up
beside the YAML first, then in the working directory. Example task file:

    task: my_mc
    dataset_path: json
    dataset_kwargs:
      data_files: {test: my_mc.jsonl}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{context}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: answer
    metric_list: [{metric: acc}, {metric: acc_norm}]
"""

from __future__ import annotations

import glob
import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.errors import InputError
from lmlab.model import device_of, require_causal_lm

try:  # the `lmlab[harness]` extra
    from lm_eval.api.model import TemplateLM as _TemplateLM
    _LM_EVAL_MISSING: ImportError | None = None
except ImportError as e:  # pragma: no cover - exercised only without the extra
    _TemplateLM, _LM_EVAL_MISSING = object, e

__all__ = ["LmlabLM", "evaluate_tasks", "load_task_config", "run_harness", "task_metrics"]

logger = logging.getLogger(__name__)

IGNORE = -100
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")
DEFAULT_MAX_GEN_TOKS = 256
LOGITS_AT_ONCE = 2 ** 25  # fp32 logits made at once in scoring (128 MB)


def _require_lm_eval() -> None:
    if _LM_EVAL_MISSING is not None:
        raise InputError("lm-eval-harness tasks need lm-eval: pip install 'lmlab[harness]' "
                         f"({_LM_EVAL_MISSING})")


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s+", " ", str(e)).strip() or type(e).__name__


# ---------------------------------------------------------------- the LM


class LmlabLM(_TemplateLM):
    """lm-eval's `LM` on an lmlab model directory (see the module docstring).

    `model_dir` is loaded with `lmlab.load`; `loaded` (an `lmlab.LoadedModel`) may be
    given instead. `max_length` caps the window (default: the model's max_seq_len).
    `batch_size` rows go through the model at once (and at most `batch_tokens`
    tokens, padding included).
    """

    backend = "causal"

    def __init__(self, model_dir: str | Path | None = None, *, loaded=None, device: str = "cpu",
                 dtype: torch.dtype | None = None, batch_size: int = 16,
                 batch_tokens: int = 16384, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, prefix_token_id: int | None = None):
        _require_lm_eval()
        super().__init__()
        if loaded is None:
            if model_dir is None:
                raise ValueError("give model_dir or loaded")
            import lmlab

            loaded = lmlab.load(model_dir, device=device, dtype=dtype)
        self.loaded = loaded
        require_causal_lm(loaded.model, f"lm-eval on {model_dir or 'the model'}")
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self._device = device_of(self.model)
        self.batch_size = max(1, int(batch_size))
        self.batch_tokens = max(1, int(batch_tokens))
        self._max_length = max_length or getattr(self.model, "max_seq_len", None)
        self._max_gen_toks = int(max_gen_toks)
        self._adds_bos = self._tokenizer_adds_bos()
        self._prefix = prefix_token_id
        self._use_hidden = _takes_return_hidden(self.model)

    # ------------------------------------------------ properties lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        if self._adds_bos:
            return self.tokenizer.bos_id
        from lmlab.infer.generate import _start_id

        return _start_id(self.tokenizer)

    @property
    def max_length(self) -> int | None:
        """The model's window in tokens (None: no limit)."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path or self.loaded.path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_dir": str(self.loaded.path),
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype)}

    # ------------------------------------------------ tokenization

    def _tokenizer_adds_bos(self) -> bool:
        """Whether the tokenizer puts BOS before a text by itself (its post-processor)."""
        bos = self.tokenizer.bos_id
        if bos is None:
            return False
        ids = self.tokenizer.hf.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """Ids of `string`, special tokens added as the tokenizer adds them by default
        (none for lmlab's; BOS for a LLaMA's), as HFLM encodes; a text that already
        starts with the prefix token gets none."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(
                self.tokenizer.decode([self.prefix_token_id]))
        if add_special_tokens:
            ids = self.tokenizer.hf.encode(string, add_special_tokens=True).ids
        else:
            ids = self.tokenizer.encode(string)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(Σ log p(continuation), greedy) for each (key, context ids, continuation ids)."""
        from tqdm import tqdm

        window = self.max_length
        rows: list[tuple[int, list[int], list[int], int]] = []  # (index, ids, targets, n_cont)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                results[i] = (0.0, True)
                continue
            if not context:
                raise ValueError("a loglikelihood request needs at least one context token")
            if window is not None and len(continuation) > window:
                raise InputError(f"a continuation of {len(continuation)} tokens is longer than "
                                 f"the model's window (max_seq_len={window})")
            seq = context + continuation
            if window is not None:
                seq = seq[-(window + 1):]
            ids, nxt = seq[:-1], seq[1:]
            n_cont = len(continuation)
            rows.append((i, ids, [IGNORE] * (len(nxt) - n_cont) + nxt[-n_cont:], n_cont))
        rows.sort(key=lambda r: (-len(r[1]), r[1]))  # longest first: the least padding
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="lmlab loglikelihood")
        for batch in self._batches(rows):
            scores = self._score([r[1] for r in batch], [r[2] for r in batch])
            for (i, *_), answer in zip(batch, scores):
                results[i] = answer
            bar.update(len(batch))
        bar.close()
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results  # type: ignore[return-value]

    def _batches(self, rows):
        """Consecutive runs of the rows (longest first): ≤ batch_size rows, ≤ batch_tokens."""
        batch: list = []
        for row in rows:
            width = len(batch[0][1]) if batch else len(row[1])
            if batch and (len(batch) >= self.batch_size
                          or (len(batch) + 1) * width > self.batch_tokens):
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    @torch.inference_mode()
    def _score(self, ids: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        """(Σ log p(target), every target the argmax) per row, rows padded on the right."""
        width = max(len(r) for r in ids)
        x = torch.tensor([r + [0] * (width - len(r)) for r in ids], device=self.device)
        y = torch.tensor([t + [IGNORE] * (width - len(t)) for t in targets], device=self.device)
        counted = y != IGNORE
        if self._use_hidden:
            rows = self.model(x, return_hidden=True)[counted]  # final hidden states (N, d)
            head = self.model.lm_head  # applied to the continuation positions only
        else:
            rows, head = self.model(x)[counted], None  # the kind's logits (N, V)
        tgt = y[counted]
        token_logp = torch.empty(len(tgt), dtype=torch.float32, device=x.device)
        hit = torch.empty(len(tgt), dtype=torch.bool, device=x.device)
        step = max(1, LOGITS_AT_ONCE // self.model.vocab_size)
        for i in range(0, len(tgt), step):
            z = rows[i:i + step] if head is None else head(rows[i:i + step])
            logp = F.log_softmax(z.float(), dim=-1)
            token_logp[i:i + step] = logp.gather(1, tgt[i:i + step, None]).squeeze(1)
            hit[i:i + step] = logp.argmax(-1) == tgt[i:i + step]
        row = counted.nonzero()[:, 0]  # the row of each counted position
        sums = torch.zeros(len(ids), dtype=token_logp.dtype, device=x.device)
        sums.index_add_(0, row, token_logp)
        misses = torch.zeros(len(ids), dtype=torch.long, device=x.device)
        misses.index_add_(0, row, (~hit).long())
        return [(float(s), bool(m == 0)) for s, m in zip(sums.tolist(), misses.tolist())]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            window = self.max_length or max(1, len(tokens))
            for context, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id,
                    max_seq_len=window, context_len=1)):
                windows.append((None, context, pred))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
        from tqdm import tqdm

        groups: dict[str, list[int]] = defaultdict(list)  # one batch shares its settings
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        results: list[str | None] = [None] * len(requests)
        eos = None if self.eot_token_id is None else self.tok_decode([self.eot_token_id],
                                                                     skip_special_tokens=False)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="lmlab generate_until")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            sampling = _sampling_args(kwargs)
            contexts = {i: self._generation_context(requests[i].args[0], max_gen_toks)
                        for i in indices}
            order = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                texts = self._generate([contexts[i] for i in chunk], max_gen_toks, until,
                                       sampling)
                for i, text in zip(chunk, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _generation_context(self, context: str, max_gen_toks: int) -> list[int]:
        """The context's ids, its rightmost max_seq_len − max_gen_toks kept as HFLM keeps
        them (half the window where max_gen_toks fills it: HFLM refuses that); an empty
        context is the prefix token."""
        ids = self.tok_encode(context) or [self.prefix_token_id]
        window = self.max_length
        if window is not None:
            keep = window - max_gen_toks if max_gen_toks < window else window // 2
            ids = ids[-max(1, keep):]
        return ids

    def _generate(self, rows: list[list[int]], max_gen_toks: int, until: list[str],
                  sampling: dict[str, Any]) -> list[str]:
        from lmlab.infer import TextStreamer, generate

        n_new = max_gen_toks
        if self.max_length is not None:  # what the window leaves (generate would log it)
            n_new = min(n_new, self.max_length - max(len(r) for r in rows) + 1)
        if n_new <= 0:
            return [""] * len(rows)
        stops = set(self.tokenizer.stop_ids)
        until = [s for s in until if s]
        longest_stop = max((len(s) for s in until), default=0)
        streamers = [TextStreamer(self.tokenizer, skip_special_tokens=True) for _ in rows]
        texts = [""] * len(rows)
        done = [False] * len(rows)
        steps = generate(self.model, rows, n_new, eos_id=sorted(stops) or None, **sampling)
        try:
            for step in steps:
                for b, tok in enumerate(step):
                    if done[b]:
                        continue
                    if tok is None or tok in stops:
                        done[b] = True
                        continue
                    piece = streamers[b].put(tok)
                    if piece:
                        seen = len(texts[b])
                        texts[b] += piece
                        tail = texts[b][max(0, seen - longest_stop + 1):]
                        if any(s in tail for s in until):
                            done[b] = True
                if all(done):
                    break
        finally:
            steps.close()
        for b, streamer in enumerate(streamers):
            if not done[b]:
                texts[b] += streamer.flush()
        return [_cut_at_stop(t, until) for t in texts]


def _takes_return_hidden(model) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "return_hidden" in params and isinstance(getattr(model, "lm_head", None),
                                                    torch.nn.Module)


def _sampling_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """lmlab's sampling arguments from lm-eval's normalized generation kwargs."""
    kwargs = dict(kwargs)
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    out: dict[str, Any] = {"temperature": 0.0}
    if do_sample:
        out["temperature"] = temperature if temperature > 0 else 1.0
        for name in ("top_k", "top_p", "seed"):
            if kwargs.get(name) is not None:
                out[name] = kwargs.pop(name)
    ignored = sorted(k for k in kwargs if k not in ("top_k", "top_p", "seed"))
    if ignored:
        logger.warning("generation kwargs %s are not used by lmlab's generation loop", ignored)
    return out


def _cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------- task files


def _data_file(name: str, yaml_path: Path) -> str:
    """An existing local data file (or a glob matching one) as an absolute path or pattern:
    relative names are looked up beside the YAML, then in the working directory."""
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [yaml_path.parent / p, Path.cwd() / p]
    for c in candidates:
        if any(ch in str(c) for ch in "*?["):
            if glob.glob(str(c)):
                return str(c.absolute())
        elif c.is_file():
            return str(c.resolve())
    looked = " or ".join(dict.fromkeys(str(c.absolute()) for c in candidates))
    raise InputError(f"{yaml_path}: data file {name} not found (no {looked})")


def load_task_config(path: str | Path) -> dict[str, Any]:
    """The task config of a local lm-eval task YAML, its data files made absolute.

    Raises InputError (one line, naming the file) for a file that is missing or cannot
    be read, a config that is not a task, or data that is not local."""
    _require_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_path = Path(path).expanduser()
    if not yaml_path.is_file():
        raise InputError(f"{path}: no such task file (give the path of a task YAML)")
    try:
        cfg = load_yaml(yaml_path, resolve_func=True)
    except Exception as e:  # yaml errors, an include or !function that fails, not a mapping
        raise InputError(f"{yaml_path}: cannot read the task YAML ({_one_line(e)})") from None
    yaml_path = yaml_path.resolve()
    if "group" in cfg or not isinstance(cfg.get("task"), str):
        raise InputError(f"{yaml_path}: not a task config (it needs a `task:` name; for a "
                         "group, give the YAML of each of its tasks)")
    dataset_path = cfg.get("dataset_path")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    data_files = cfg.pop("data_files", None)
    if data_files is None:
        data_files = kwargs.get("data_files")
    if cfg.get("custom_dataset") is None:
        if not isinstance(dataset_path, str) or not dataset_path:
            raise InputError(f"{yaml_path}: no dataset_path (e.g. `dataset_path: json` with "
                             "`data_files`)")
        local_dir = (yaml_path.parent / dataset_path).expanduser()
        if dataset_path not in LOCAL_BUILDERS:
            if not local_dir.is_dir():
                raise InputError(
                    f"{yaml_path}: dataset_path {dataset_path!r} is neither a local builder "
                    f"({', '.join(LOCAL_BUILDERS)}) nor a directory beside the YAML; lmlab "
                    "reads task data from local files only")
            cfg["dataset_path"] = str(local_dir.resolve())
        elif data_files is None:
            raise InputError(f"{yaml_path}: dataset_path {dataset_path} needs data_files "
                             "(e.g. `dataset_kwargs: {data_files: {test: FILE.jsonl}}`)")
    if data_files is not None:
        if isinstance(data_files, (str, Path)):
            data_files = _data_file(str(data_files), yaml_path)
        elif isinstance(data_files, list):
            data_files = [_data_file(str(f), yaml_path) for f in data_files]
        elif isinstance(data_files, dict):
            data_files = {split: ([_data_file(str(f), yaml_path) for f in files]
                                  if isinstance(files, list) else _data_file(str(files), yaml_path))
                          for split, files in data_files.items()}
        else:
            raise InputError(f"{yaml_path}: data_files must be a file, a list of files or "
                             f"{{split: file}}, not {type(data_files).__name__}")
        kwargs["data_files"] = data_files
        cfg["dataset_kwargs"] = kwargs
    return cfg


def evaluate_tasks(lm, tasks: list[str | Path | dict[str, Any]], limit: int | float | None = None,
                   log_samples: bool = False, bootstrap_iters: int = 1000,
                   **kwargs) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` (any lm-eval LM) on local task YAMLs (or configs
    as `load_task_config` returns them): its whole result, samples too with `log_samples`."""
    _require_lm_eval()
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    configs = [t if isinstance(t, dict) else load_task_config(t) for t in tasks]
    if not configs:
        raise InputError("no task files given")
    # only the tasks given: lm-eval's own index of ~200 task folders is not read
    manager = TaskManager(include_defaults=False)
    return evaluator.simple_evaluate(model=lm, tasks=configs, limit=limit,
                                     task_manager=manager, log_samples=log_samples,
                                     bootstrap_iters=bootstrap_iters, **kwargs)


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results: "acc,none" becomes "acc" (another
    filter keeps lm-eval's "metric,filter" name); values that are not numbers are left out."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt in ("", "none") else key] = float(value)
        out[task] = metrics
    return out


def run_harness(model_dir: str, tasks: list[str], limit: int | None = None,
                device: str = "cpu") -> dict[str, dict[str, float]]:
    """Run local lm-eval task YAMLs on the lmlab model in `model_dir`: {task: {metric: value}}.

    Every task file is read and its data files found before the model is loaded; a
    file that cannot be read, or a missing data file, is an InputError naming it."""
    configs = [load_task_config(t) for t in tasks]
    if not configs:
        raise InputError("no task files given (--harness-tasks path/to/task.yaml)")
    lm = LmlabLM(model_dir, device=device)
    return task_metrics(evaluate_tasks(lm, configs, limit=limit))
