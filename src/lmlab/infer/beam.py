"""Decoding an encoder–decoder: greedy (the one generation loop) and beam search, batched.

Both encode the sources once, then extend the target one token per step with
the decoder's cache (`lmlab.model.seq2seq`: `encode`, `start_decoding`,
`decode_step`, `reorder`); nothing here knows the model's insides.

**Greedy** takes the most likely next token at every step. It is
`lmlab.infer.generate` itself, at temperature 0, on the decoder bound to the
encoded sources (`model.conditioned`), every row's prompt the start token.

**Beam search** keeps the K best partial targets (beams) of every source. At
each step every beam is extended by every token, each extension scored by its
log-probability so far, log p(y₁..y_t | x) = Σ log p(y_i | y_<i, x), and the K
best of the K·V extensions go on. An extension that ends in EOS leaves the beam
as a finished hypothesis, ranked by

    score(Y) = log p(Y | x) / |Y|^α        (α = `length_penalty`; |Y| counts EOS)

since log p only falls as Y grows, α = 0 prefers short targets, α = 1 compares
log-probability per token. A source is done when it has K finished hypotheses
and its best live beam, ended now, would not beat the worst of them (exact for
α = 0: no continuation can raise a log-probability; for α > 0 the bound of
Hugging Face's `early_stopping=False`). Beams that reach `max_new_tokens`
finish as they stand.

Batched over sentences: B sources × K beams are B·K rows of one decoder batch;
each step takes the top 2K of each source's K·V extensions with one `topk`
(at most K of them end in EOS, so K live beams always remain), and `reorder`
moves the cache rows to the beams they continue. A source that is done keeps
computing (its rows are ignored) until every source is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmlab.infer.generate import generate_ids


@dataclass
class Hypothesis:
    ids: list[int]  # the target, without the start token and without EOS
    logprob: float  # log p(ids + [EOS] | source), or of ids alone if it ran out of length
    score: float  # logprob / length^α


def _budget(model: nn.Module, max_new_tokens: int | None) -> int:
    limit = model.max_seq_len
    n = limit if max_new_tokens is None else min(max_new_tokens, limit)
    if n < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return n


@torch.inference_mode()
def greedy(model: nn.Module, src: torch.Tensor, src_lengths: torch.Tensor, start_id: int,
           eos_id: int, max_new_tokens: int | None = None) -> list[list[int]]:
    """The most likely token at every step, per source (EOS not included)."""
    conditioned = model.conditioned(model.encode(src, src_lengths))
    rows = generate_ids(conditioned, [[start_id]] * src.shape[0],
                        _budget(model, max_new_tokens), temperature=0, eos_id=eos_id)
    return [r[:-1] if r and r[-1] == eos_id else r for r in rows]


@torch.inference_mode()
def beam_search(model: nn.Module, src: torch.Tensor, src_lengths: torch.Tensor, start_id: int,
                eos_id: int, beam: int = 4, length_penalty: float = 1.0,
                max_new_tokens: int | None = None) -> list[Hypothesis]:
    """The best hypothesis of each source (rows of `src`, right-padded) by `score`."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    B, K, n_new = src.shape[0], beam, _budget(model, max_new_tokens)
    state = model.start_decoding(model.encode(src, src_lengths).repeat_interleave(K), n_new)
    device = src.device
    tokens = torch.full((B * K, 1), start_id, dtype=torch.long, device=device)
    history = tokens[:, :0]
    # log p of each live beam; all but one beam start at −inf, so step 1 extends one start
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B

    def finish(b: int, ids: list[int], logprob: float, length: int) -> None:
        finished[b].append(Hypothesis(ids, logprob, logprob / length ** length_penalty))
        finished[b].sort(key=lambda h: -h.score)
        del finished[b][K:]

    for t in range(n_new):
        logp = torch.log_softmax(model.decode_step(tokens, state).float(), -1)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        top, idx = cand.topk(min(2 * K, K * V), dim=1)
        top_l, idx_l = top.tolist(), idx.tolist()
        rows, next_tok, next_scores = [], [], []
        for b in range(B):
            keep = []  # (row it continues, token, log p) of the next live beams
            for rank, (s, i) in enumerate(zip(top_l[b], idx_l[b])):
                if done[b] or len(keep) == K or s == float("-inf"):
                    break
                origin, tok = b * K + i // V, i % V
                if tok != eos_id:
                    keep.append((origin, tok, s))
                elif rank < K:
                    finish(b, history[origin].tolist(), s, t + 1)
            if not done[b]:
                best_live = keep[0][2] / (t + 1) ** length_penalty if keep else float("-inf")
                done[b] = len(finished[b]) == K and best_live <= finished[b][-1].score or not keep
            if done[b]:  # nothing left to extend: rows ride along, ignored
                keep = [(b * K + k, eos_id, float("-inf")) for k in range(K)]
            keep += [keep[-1][:2] + (float("-inf"),)] * (K - len(keep))  # (a tiny vocabulary)
            for origin, tok, s in keep:
                rows.append(origin)
                next_tok.append(tok)
                next_scores.append(s)
        rows_t = torch.tensor(rows, device=device)
        tokens = torch.tensor(next_tok, device=device)[:, None]
        history = torch.cat([history.index_select(0, rows_t), tokens], dim=1)
        scores = torch.tensor(next_scores, device=device).view(B, K)
        if all(done):
            break
        if t + 1 < n_new:
            state = model.reorder(state, rows_t)
    # sources still searching at the length limit: their live beams finish as they stand
    for b in range(B):
        if not done[b]:
            for k in range(K):
                s = float(scores[b, k])
                if s > float("-inf"):
                    finish(b, history[b * K + k].tolist(), s, history.shape[1])
    return [f[0] for f in finished]
