"""r2r.py: R2R ("Roads to Rome", arXiv 2505.21600) and what the scripts share.

Top to bottom: the router's features, the router and its baselines, the four steps of mixed
decoding and the loop over them (batch size 1, then batched); then the plumbing: the pair's
limits, the answer rule, the label files, command line, device, loading, prompts. fast.py runs
the loop's seam on CUDA graphs. No labeling, training or reports: those are the scripts."""

import argparse
import contextlib
import hashlib
import json
import math
import os
import pathlib
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

PAPER = "https://arxiv.org/abs/2505.21600"


class R2RError(Exception):
    """Bad input: the scripts print its message as one line and exit with status 1."""


# ----------------------------------------------------------------------------- the router


def forward(model, ids, cache=None, *, last=False, **kw):
    """One pass over `ids` (B, T) extending `cache` (`kw`: a padded batch's mask and positions)
    -> the last hidden state (B, T, H) and logits (B, T, V), or with last=True (B, 1, V): a
    4K-token prefill's T x V logits cost gigabytes."""
    # The SLM and the LLM may sit on different devices.
    ids = ids.to(model.device)
    kw = {k: v.to(model.device) for k, v in kw.items()}
    # The base model returns the last hidden state only, not every layer's.
    out = model.base_model(input_ids=ids, cache=cache, use_cache=cache is not None, **kw)
    hidden = out.last_hidden_state  # (B, T, H)
    return hidden, model.get_output_embeddings()(hidden[:, -1:] if last else hidden)


def router_inputs(slm, hidden, logits, tokens, k):
    """The router's features (R2R Stage 2), for labels and decoding alike: the SLM's last hidden
    state (N, H), its sorted top-k logits (N, k), and its input embedding of the token it is
    about to emit (N, H)."""
    topk = logits.float().topk(k, dim=-1).values  # (N, k)
    return hidden.float(), topk, slm.get_input_embeddings()(tokens).float()


class Block(nn.Module):
    """Pre-norm residual MLP block: x + Dropout(W2 GELU(W1 LayerNorm(x)))."""

    def __init__(self, width, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class Router(nn.Module, PyTorchModelHubMixin, library_name="r2r", paper_url=PAPER):
    """Scores an SLM step; high means "the LLM writes this token" (R2R Stage 2; the authors use 6
    blocks of width 1024, 56M parameters). The hub mixin gives save_pretrained, push_to_hub and
    from_pretrained: model.safetensors + config.json."""

    def __init__(
        self, hidden_size, top_k=100, width=128, n_blocks=2, dropout=0.1, threshold=0.5, slm=None
    ):
        super().__init__()
        sizes = dict(hidden_size=hidden_size, top_k=top_k, width=width, n_blocks=n_blocks)
        self.config = dict(sizes, dropout=dropout, threshold=threshold, slm=slm)
        # One dict, so that a threshold set after training is saved too.
        self._hub_mixin_config = self.config
        self.logit_proj = nn.Linear(top_k, hidden_size)
        # Hidden states and logits live on very different scales.
        self.norm = nn.LayerNorm(3 * hidden_size)
        self.inp = nn.Linear(3 * hidden_size, width)
        self.blocks = nn.Sequential(*[Block(width, dropout) for _ in range(n_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))

    @property
    def threshold(self):
        return self.config["threshold"]

    def forward(self, hidden, topk, emb):
        """(N, H), (N, k), (N, H) -> (N,) logits; their sigmoid is the routing score."""
        x = torch.cat([hidden, self.logit_proj(topk), emb], dim=-1)  # (N, 3H)
        return self.out(self.blocks(self.inp(self.norm(x)))).squeeze(-1)

    @classmethod
    def _load_as_pickle(cls, model, model_file, map_location, strict):
        raise R2RError(
            f"{model_file}: r2r loads routers only from model.safetensors, never pickled weights"
        )


class ConfidenceRouter(nn.Module):
    """The authors' baselines: route by SLM entropy, by low top-1 probability, or at random,
    read off the top-k logits (exact when k covers the vocabulary). Router's interface."""

    def __init__(self, kind, top_k, threshold=0.5, generator=None):
        super().__init__()
        self.kind = kind
        self.generator = generator
        self.config = dict(top_k=top_k, threshold=threshold)

    threshold = Router.threshold

    def forward(self, hidden, topk, emb):
        return torch.logit(confidence_scores(topk, self.generator)[self.kind], eps=1e-6)


def confidence_scores(topk, generator=None):
    """(N, k) top-k logits -> scores in [0, 1], higher = less sure: normalised entropy,
    1 - top-1 probability, and a uniform random draw."""
    logp = F.log_softmax(topk.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1) / math.log(topk.shape[-1])
    random = torch.rand(topk.shape[0], generator=generator, device=topk.device)
    return dict(entropy=entropy.clamp(0, 1), top1=1 - logp[:, 0].exp(), random=random)


# ----------------------------------------------------------------------------- the four steps


def slm_step(slm, fresh, cache, V, **kw):
    """Step 1: the SLM reads `fresh` (B, T), the tokens it has not read: the prompts, then each
    committed token (`kw`: a padded batch's mask and positions). -> hidden (B, H), logits (B, V)."""
    hidden, logits = forward(slm, fresh, cache, last=True, **kw)
    return hidden[:, -1], logits[:, -1, :V]


def route(router, slm, hidden, logits, tokens, threshold, n):
    """Step 2: which candidates `tokens` (B,) for new token n go to the LLM? -> (B,) bools. The
    router decides before any cache has read the token, which is why R2R never rolls back."""
    features = router_inputs(slm, hidden, logits, tokens, router.config["top_k"])
    scores = check_finite(torch.sigmoid(router(*features)), "router", n)
    # Compared in float64 (MPS has none), so every engine routes the same scores alike.
    return scores.to(torch.float32 if scores.device.type == "mps" else torch.float64) >= threshold


def catch_up(llm, gap, cache, **kw):
    """Step 3, R2R's catch-up (Stage 3): ONE LLM pass over `gap` (B, T_gap), every token
    committed since its last call: a prefill of the gap. -> its next-token logits (B, V)."""
    return forward(llm, gap, cache, last=True, **kw)[1][:, -1]


def sample(logits, temperature, top_p, u):
    """Tokens (B,) from logits (B, V): the argmax at temperature 0, else the token where the top-p
    CDF reaches the uniform draw u (B,); no host sync."""
    if temperature == 0:
        return logits.argmax(-1)
    p, idx = F.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True)
    # The smallest prefix whose mass reaches top_p.
    p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0)  # (B, V)
    cdf = p.cumsum(-1)  # (B, V)
    j = torch.searchsorted(cdf, u[:, None].to(cdf) * cdf[:, -1:])  # (B, 1)
    return idx.gather(-1, j.clamp(max=p.shape[-1] - 1))[:, 0]


def check_finite(x, who, n):
    """x, the logits or scores of the `who` (SLM, LLM or router) at new token n; where they hold
    NaN or inf, one line that stops decoding. x may be a bool (fast.py checks inside its graphs)."""
    if not (x if isinstance(x, bool) else torch.isfinite(x).all()):
        what, fix = "logits", "fp16 overflow? try --dtype bfloat16 or float32"
        if who == "router":
            what, fix = "scores", "are its weights NaN? train it again"
        raise R2RError(f"the {who} gave NaN or inf {what} at new token {n} ({fix})")
    return x


def uniforms(generators, device):
    """One uniform draw per row (B,), row b from generators[b] (None: torch's own), on `device`."""
    draws = [torch.rand(1, generator=g, device=g.device if g else device) for g in generators]
    return torch.cat(draws).to(device)


def mean_catch_up(gaps):
    """Mean new tokens an LLM call read (its gap), leaving out a first call that read only the
    prompt: [0, 3, 5] -> 4.0. The one definition behind every "mean catch-up" r2r prints."""
    gaps = [g for g in gaps if g]
    return sum(gaps) / max(len(gaps), 1)


class Sampling(NamedTuple):
    """How a decode picks its tokens: the argmax at temperature 0, else top-p sampling with draws
    from `generator` (None: torch's own)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


class Proposal(NamedTuple):
    """What steps 1-2 give the loop: the SLM's candidate, and whether the router sends it on."""

    token: int
    routed: bool


@dataclass
class Trace:
    """One decode: its new tokens, who wrote each (1 = the LLM), the gap each LLM call read (new
    tokens only), seconds."""

    tokens: list = field(default_factory=list)
    from_llm: list = field(default_factory=list)
    gaps: list = field(default_factory=list)
    seconds: float = 0.0
    # New tokens the LLM had read at its last call.
    llm_read: int = 0

    def commit(self, token, routed):
        """Step 4: the token joins the response; an LLM call read every token before it."""
        if routed:
            self.gaps.append(len(self.tokens) - self.llm_read)
            self.llm_read = len(self.tokens)
        self.tokens.append(token)
        self.from_llm.append(int(routed))

    @property
    def llm_share(self):
        return sum(self.from_llm) / max(len(self.tokens), 1)

    @property
    def mean_catch_up(self):
        return mean_catch_up(self.gaps)

    def activated_params(self, p_slm, p_llm):
        """Average activated parameters per token, the authors' (n_slm P_slm + n_llm P_llm) / n."""
        n_llm = sum(self.from_llm)
        return ((len(self.tokens) - n_llm) * p_slm + n_llm * p_llm) / max(len(self.tokens), 1)

    @classmethod
    def join(cls, traces):
        """Many decodes as one, for statistics over a whole run."""
        joined = cls(seconds=sum(x.seconds for x in traces))
        for x in traces:
            joined.tokens += x.tokens
            joined.from_llm += x.from_llm
            joined.gaps += x.gaps
        return joined


class EagerEngine:
    """Steps 1-3 over two DynamicCaches, the seam `decode` runs on: start() a prompt, propose()
    (steps 1-2), catch_up() (step 3). fast.FastEngine implements the same seam."""

    def __init__(self, slm, llm, tok):
        self.slm = slm
        self.llm = llm
        # Only the shared tokenizer's ids are ever compared or emitted.
        self.vocab_size = len(tok)
        self.limits = pair_limits(tok, slm, llm)

    def start(self, router, prompt_ids, *, use_router, threshold, sampling, max_new_tokens):
        """A new prompt: empty caches (they grow as needed), and how steps 1-3 decide and pick."""
        self.slm_cache = DynamicCache()
        self.llm_cache = DynamicCache()
        self.router = router
        self.use_router = use_router
        self.threshold = threshold
        self.temperature, self.top_p, self.generator = sampling
        self.prompt_len = len(prompt_ids)

    def pick(self, logits):
        """A token (1,) from logits (1, V): greedy, or by one draw from the prompt's generator."""
        u = uniforms([self.generator], logits.device) if self.temperature else None
        return sample(logits, self.temperature, self.top_p, u)

    def propose(self, fresh):
        """Steps 1-2: the SLM reads the token ids `fresh` and proposes a candidate; the router
        decides."""
        hidden, logits = slm_step(self.slm, torch.tensor([fresh]), self.slm_cache, self.vocab_size)
        # The new token's index: the cache holds the prompt and the new tokens before it.
        n = self.slm_cache.get_seq_length() - self.prompt_len + 1
        token = self.pick(check_finite(logits, "SLM", n))  # (1,)
        if not self.use_router:
            return Proposal(token.item(), False)
        routed = route(self.router, self.slm, hidden, logits, token, self.threshold, n)
        return Proposal(token.item(), routed.item())

    def catch_up(self, gap):
        """Step 3: the LLM reads the token ids `gap` in one pass and writes the next token."""
        logits = catch_up(self.llm, torch.tensor([gap]), self.llm_cache)[:, : self.vocab_size]
        n = self.llm_cache.get_seq_length() - self.prompt_len + 1
        return self.pick(check_finite(logits, "LLM", n)).item()


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def decode(
    engine,
    router,
    prompt_ids,
    *,
    max_new_tokens,
    mode="r2r",
    threshold=None,
    temperature=0.0,
    top_p=1.0,
    generator=None,
    eos=None,
    on_step=None,
):
    """R2R's mixed decoding (Stage 3) of one prompt over `engine` -> Trace. Mode "slm" or "llm"
    sends every token to one model. Stops after an id in `eos` (default: the pair's stop ids),
    after max_new_tokens, or at the models' last position. After each step, for streaming and
    tests: on_step(slm_cache, llm_cache, [trace]).

    The cache invariant: after n commits the SLM cache holds prompt + n - 1 new tokens (it reads
    the last at its next step), the LLM cache prompt + the new tokens up to its last call, and
    `gap` the rest. No cache ever holds an uncommitted token, so nothing is rolled back."""
    threshold = default_threshold(router, threshold)
    eos = engine.limits.eos if eos is None else eos
    n_new = room(engine.limits, prompt_ids, max_new_tokens)
    engine.start(
        router,
        prompt_ids,
        use_router=mode == "r2r",
        threshold=threshold,
        sampling=Sampling(temperature, top_p, generator),
        max_new_tokens=n_new,
    )
    trace = Trace()
    # The SLM reads `fresh` at its next step; the LLM reads `gap` at its next call.
    fresh = list(prompt_ids)
    gap = list(prompt_ids)
    t0 = time.perf_counter()
    for _ in range(n_new):
        # 1.-2. The SLM reads what it has not read and proposes a candidate; the router decides.
        token, routed = engine.propose(fresh) if mode != "llm" else Proposal(None, True)
        # 3. Routed: the LLM catches up on the gap in one pass; its token replaces the candidate.
        if routed:
            token = engine.catch_up(gap)
            gap = []
        # 4. Commit: the token joins the response; each model reads it at its next call.
        trace.commit(token, routed)
        gap.append(token)
        fresh = [token]
        if on_step is not None:
            on_step(engine.slm_cache, engine.llm_cache, [trace])
        if token in eos:
            break
    trace.seconds = elapsed(t0, engine.llm.device)
    return trace


def default_threshold(router, threshold):
    """The threshold a decode routes at: the one asked, else the router's saved one."""
    return router.threshold if threshold is None and router is not None else threshold


# ----------------------------------------------------------------------------- the batched loop


class Row(NamedTuple):
    """One prompt of a batched decode: its trace, its generator, the new tokens it may get."""

    trace: Trace
    generator: torch.Generator | None
    room: int


@dataclass
class BatchTrace:
    """A batched decode: a Trace per row, its steps, the gap each batched LLM call read, seconds."""

    traces: list
    steps: int = 0
    gaps: list = field(default_factory=list)
    seconds: float = 0.0


def left_pad(prompts, device):
    """B prompts as one batch, left-padded to T columns -> ids, mask and positions, each (B, T).
    Positions count each row's own tokens (0 on padding), so a row's logits are its batch-1's."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return ids, mask, pos


def keep_rows(keep, caches, *tensors):
    """Only the rows `keep` of both caches and of each (B, ...) tensor -> the tensors (b, ...).
    The index stays on the CPU: it indexes caches on any device (device_map)."""
    idx = torch.tensor(keep, dtype=torch.long)
    for cache in caches:
        cache.batch_select_indices(idx)
    return [x[idx] for x in tensors]


@torch.no_grad()
def decode_batch(
    engine,
    router,
    prompts,
    *,
    max_new_tokens,
    mode="r2r",
    threshold=None,
    temperature=0.0,
    top_p=1.0,
    generators=None,
    eos=None,
    on_step=None,
    stop=None,
    traces=None,
):
    """`decode` for B prompts -> BatchTrace: the four steps again, with a batch dimension.

    It is a second loop because a batch changes two things. Every live row commits one token a
    step, so all rows have read equally many columns, and when ANY row is routed, ONE catch-up
    (B, gap) serves the batch; only the routed rows take the LLM's token (a step calls the LLM
    with probability 1 - (1 - s)^B at LLM share s). And rows leave: a row that stops leaves the
    batch and both caches, so the rest stop paying for it. Prompts are left-padded (left_pad);
    row b draws from generators[b] in decode's order, so its Trace equals its batch-1 decode.
    stop(trace) -> True ends a row too (a server's stop strings, a client that left); `traces`
    are the rows' Traces to fill (default: new ones)."""
    threshold = default_threshold(router, threshold)
    eos = engine.limits.eos if eos is None else eos
    slm, llm, V = engine.slm, engine.llm, engine.vocab_size
    dev = llm.device
    ids, mask, pos = left_pad(prompts, dev)
    T = ids.shape[1]
    slm_cache = DynamicCache()
    llm_cache = DynamicCache()
    generators = generators or [None] * len(prompts)
    traces = traces or [Trace() for _ in prompts]
    live = [
        Row(t, g, room(engine.limits, p, max_new_tokens))
        for t, g, p in zip(traces, generators, prompts)
    ]
    batch = BatchTrace([row.trace for row in live])
    t0 = time.perf_counter()
    # ids (b, T + n) holds the prompts and every committed column of the b live rows; a cache has
    # read get_seq_length() columns, so ids[:, s:] is what it has not read.
    for n in range(max_new_tokens):
        # 1. SLM step over the columns it has not read: a candidate per live row.
        tokens = [None] * len(live)
        if mode != "llm":
            s = slm_cache.get_seq_length()
            hidden, logits = slm_step(
                slm, ids[:, s:], slm_cache, V, attention_mask=mask, position_ids=pos[:, s:]
            )
            u = uniforms([row.generator for row in live], logits.device) if temperature else None
            candidates = sample(check_finite(logits, "SLM", n + 1), temperature, top_p, u)  # (b,)
            tokens = candidates.tolist()
        # 2. Route each row.
        if mode == "r2r":
            routed = route(router, slm, hidden, logits, candidates, threshold, n + 1).tolist()
        else:
            routed = [mode == "llm"] * len(live)
        # 3. One LLM catch-up for the whole batch; only the routed rows take its token.
        if any(routed):
            s = llm_cache.get_seq_length()
            # The gap in new tokens only, as Trace.gaps counts it.
            batch.gaps.append(ids.shape[1] - max(s, T))
            logits = catch_up(
                llm, ids[:, s:], llm_cache, attention_mask=mask, position_ids=pos[:, s:]
            )[:, :V]  # (b, V)
            rows = [i for i, r in enumerate(routed) if r]
            u = uniforms([live[i].generator for i in rows], logits.device) if temperature else None
            logits = check_finite(logits[rows], "LLM", n + 1)
            for i, token in zip(rows, sample(logits, temperature, top_p, u).tolist()):
                tokens[i] = token
        # 4. Commit: each live row's token joins its response and the next column.
        ids = torch.cat([ids, torch.tensor(tokens, device=dev)[:, None]], dim=1)  # (b, T + n + 1)
        mask = F.pad(mask, (0, 1), value=1)  # (b, T + n + 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)  # (b, T + n + 1)
        batch.steps = n + 1
        now = elapsed(t0, dev)
        for row, token, r in zip(live, tokens, routed):
            row.trace.commit(token, r)
            row.trace.seconds = now
        # Rows that stopped leave the batch and both caches.
        keep = [i for i, row in enumerate(live) if not finished(row, eos, stop)]
        if len(keep) < len(live):
            ids, mask, pos = keep_rows(keep, (slm_cache, llm_cache), ids, mask, pos)
            live = [live[i] for i in keep]
        if on_step is not None:
            on_step(slm_cache, llm_cache, [row.trace for row in live])
        if not live:
            break
    batch.seconds = elapsed(t0, dev)
    return batch


def finished(row, eos, stop=None):
    """Whether a batched row stops: after a stop id, at its room, or when stop(trace) says so."""
    trace = row.trace
    return (
        trace.tokens[-1] in eos
        or len(trace.tokens) >= row.room
        or (stop is not None and stop(trace))
    )


# ============================================================ plumbing

# ----------------------------------------------------------------------------- a pair's limits


class Limits(NamedTuple):
    """What ends every response of a pair, in every script alike: a stop id, or the last
    position that every model can place."""

    eos: frozenset
    positions: int


def pair_limits(tok, *models):
    """The stop ids (the tokenizer's EOS and every EOS id of the models' generation configs) and
    the positions (prompt + response) every model can place; None models are skipped."""
    models = [m for m in models if m is not None]
    eos = [tok.eos_token_id] + [m.generation_config.eos_token_id for m in models]
    ids = frozenset(i for e in eos if e is not None for i in ([e] if isinstance(e, int) else e))
    sizes = [getattr(m.config.get_text_config(), "max_position_embeddings", None) for m in models]
    sizes += [rope_limit(m.config) for m in models]
    return Limits(ids, min(filter(None, sizes), default=sys.maxsize))


def rope_limit(config):
    """The most positions a model of `config` reads with the RoPE factors it starts with (None:
    they never change); r2r stops there to stay exact, as transformers 5 picks each call's
    factors by its largest position while cached keys keep the old ones. longrope (Phi-3/3.5/4,
    PhiMoE) switches past original_max_position_embeddings, dynamic NTK past
    max_position_embeddings, where r2r stops anyway."""
    text = config.get_text_config()
    params = getattr(text, "rope_parameters", None) or {}
    limits = []
    # One dict, or one per layer type.
    for p in [params] if "rope_type" in params else params.values():
        kind = p.get("rope_type", "") if isinstance(p, dict) else ""
        if kind == "longrope":
            limits.append(p.get("original_max_position_embeddings"))
        elif "dynamic" in kind:
            limits.append(getattr(text, "max_position_embeddings", None))
    return min(filter(None, limits), default=None)


def room(limits, prompt_ids, max_new_tokens):
    """New tokens a prompt may get: max_new_tokens, or fewer where the models' positions end."""
    if len(prompt_ids) >= limits.positions:
        raise R2RError(
            f"a prompt of {len(prompt_ids)} tokens leaves no room in the models' "
            f"{limits.positions} positions: shorten it"
        )
    return min(max_new_tokens, limits.positions - len(prompt_ids))


def note_cut(limits, traces, rooms, max_new_tokens):
    """After decoding: one note if a response stopped at the models' positions (its room), not
    at a stop id."""
    if any(
        len(t.tokens) == r < max_new_tokens and t.tokens[-1] not in limits.eos
        for t, r in zip(traces, rooms)
    ):
        status(
            f"note: responses stop at the models' {limits.positions} positions, before "
            f"{max_new_tokens} new tokens"
        )


# ----------------------------------------------------------------------------- the answer rule

# Not the method: how label.py's verifier and evaluate.py's accuracy read a final answer.
# A number as people write it: 72, -3.5, 1,000, .5
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
# What wraps an answer: $...$, \[...\], **bold**, a last "."
WRAPPING = r"^(?:[\s$*]|\\[\[(])+|(?:[\s$*.]|\\[\])])+$"
PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(text):
    """The normalised final answer of a response or a dataset's answer, or None. The first rule
    that applies: GSM8K's "#### 72"; the last \\boxed{...} or \\fbox{...}; digits closing the
    text after "so"/"thus"/"answer (is)", spaces dropped ("... so 7 7 9 3" -> "7793", the demo
    task); the sentence after the last "answer is"/"answer:"; the whole text if it has no words
    ("\\frac{1}{2}", "x = 5"); else the last number or $...$ in it ("... 18 dollars." -> "18")."""
    if text is None:
        return None
    # A Unicode minus, and thousands written 9{,}500 or 9\,500.
    text = str(text).replace("\u2212", "-")
    text = re.sub(r"(?<=\d)(?:\{,\}|\\,)(?=\d{3}\b)", ",", text)
    if "####" in text:
        return answer_of(text.rsplit("####", 1)[1].strip().split("\n")[0])
    box = boxed(text)
    if box is not None:
        return answer_of(box)
    m = re.search(r"\b(?:so|thus|answer(?: is)?)\s*:?\s*(-?\d(?:[\d ,]*\d)?)\s*\.?\s*$", text)
    if m:
        return re.sub(r"[ ,]", "", m.group(1))
    said = list(re.finditer(r"answer\s*(?:is|:)\s*:?(.+)", text, re.IGNORECASE))
    if said:
        answer = answer_of(re.split(r"\.(?:\s|$)", said[-1].group(1))[0], prose=False)
        if answer:
            return answer
    # No words: a bare answer ("\frac{1}{2}", "x = 5", "\text{odd}").
    if not re.search(r"(?:^|\s)[A-Za-z]{3,}", re.sub(r"\{[^{}]*\}", "", text)):
        return answer_of(text)
    spans = re.findall(rf"\$\$?([^$]+)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]|({NUMBER})", text, re.S)
    return answer_of("".join(spans[-1])) if spans else None


def same_answer(response, reference):
    """Whether two texts give the same final answer (final_answer, both sides alike: a response,
    a dataset's answer, or GSM8K's "... #### 72"): one string once normalised, or equal as math
    by HF's math-verify ("0.5" = "\\frac{1}{2}"). No answer on either side is never the same."""
    a, b = final_answer(response), final_answer(reference)
    if a is None or b is None:
        return False
    # Equal strings, or two plain numbers: math-verify has nothing to add.
    if a == b or PLAIN_NUMBER.fullmatch(a) and PLAIN_NUMBER.fullmatch(b):
        return a == b
    # Imported here: sympy takes most of a second to load.
    from math_verify import parse, verify

    # math-verify times out by signal.alarm, which works only in the main thread.
    t = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${b}$", parsing_timeout=t)
    pred = parse(f"${a}$", parsing_timeout=t)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=t))


def boxed(text):
    """What the last \\boxed{...} or \\fbox{...} holds (braces balanced), or "\\boxed 5"'s 5; ""
    for a box that never closes (a response cut short); None for no box."""
    boxes = list(re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*(\{)?", text))
    if not boxes:
        return None
    box = boxes[-1]
    if box.group(1) is None:
        return re.match(r"[^\s$]*", text[box.end() :]).group()
    depth = 0
    for i in range(box.start(1), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[box.end() : i]
    return ""


def answer_of(s, prose=True):
    """One spelling per answer: "$x = \\dfrac12$." -> "\\frac{1}{2}", "\\$1{,}000 dollars" ->
    "1000", "5\\text{ cm}" -> "5", "3.50" -> "3.5", "-1/2" -> "-\\frac{1}{2}", "50\\%" -> "50",
    "\\text{odd}" -> "odd"; None for nothing, or where prose=False and it reads as prose ("the
    answer: first compute 5+3=8")."""
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    # \frac12 and \frac ab.
    s = re.sub(r"\\frac\s*([^\s{}\\])\s*([^\s{}\\])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\(?:left|right|displaystyle)\b|(?<!\\)\\[,;:! $]|\^\{?\\circ\}?|\\?%", "", s)
    # x = 5 -> 5
    s = re.sub(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*", "", re.sub(WRAPPING, "", s))
    # Words or a unit after the number: "18 dollars", "72, in total".
    m = re.match(
        rf"({NUMBER})\s*,?\s*(?:\\(?:text|mbox|mathrm)\s*\{{)?\s*[A-Za-z]{{2,}}\b[^=]*$", s
    )
    s = m.group(1) if m else s
    s = re.sub(WRAPPING, "", re.sub(r"\s+", "", s))
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        s = rf"{m[1]}\frac{{{m[2]}}}{{{m[3]}}}"
    # 72.00 -> 72, .5 -> 0.5
    if re.fullmatch(r"-?\d*\.?\d+", s):
        s = format(Decimal(s).normalize(), "f")
    if not s or not prose and re.search(r"(?<![\\A-Za-z{])[A-Za-z]{3,}", s):
        return None
    return re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r"\1", s)


# ----------------------------------------------------------------------------- label files


# meta.json's "format": 2 since label.py's write_shard (which states the columns) stores the
# features as fixed-size lists in --feature-dtype, memory-mappable; older folders are refused.
LABEL_FORMAT = 2


def check_label_format(meta, folder):
    """Refuse a label folder in another format than this r2r's, before anything reads it."""
    if meta.get("format") != LABEL_FORMAT:
        raise R2RError(
            f"{folder} holds labels in format {meta.get('format', 1)}, and r2r reads format "
            f"{LABEL_FORMAT}: relabel with label.py (another --out, or delete {folder})"
        )


def load_labels(folder):
    """A label.py folder: (its meta.json, every finished shard as one memory-mapped dataset)."""
    import datasets

    meta_file = pathlib.Path(folder, "meta.json")
    if not meta_file.is_file():
        raise R2RError(f"no labels in {folder} (no meta.json): give a folder that label.py wrote")
    meta = read_json(meta_file, "slm", "fingerprint")
    check_label_format(meta, folder)
    files = sorted(pathlib.Path(folder, "shards").glob("*/data.arrow"))
    # Finished shards: a .tmp is a write under way or killed; a chunk that kept no row (every
    # response unfinished) has no data.arrow.
    parts = [datasets.Dataset.from_file(str(f)) for f in files if f.parent.suffix != ".tmp"]
    return meta, datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({})


# ----------------------------------------------------------------------------- command line

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
# "owner/name" or "name", but not "x.jsonl".
HUB_NAME = re.compile(r"(?!.*\.(txt|jsonl?)$)\w[\w.-]*(/\w[\w.-]*)?")


def run_main(main):
    """Run a script's main(); bad input, or a file it cannot read or write (disk full, no
    permission), becomes one line on stderr, never a traceback. Ctrl-C exits with status 130, and
    with stdout piped into a program that left (`head`), quietly with 141, as for SIGPIPE."""
    try:
        main()
        # Here, not at exit, where a closed pipe could not be caught.
        sys.stdout.flush()
    except R2RError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        # generate.py may have been streaming the LLM's tokens in colour.
        if sys.stdout.isatty():
            sys.stdout.write("\033[0m")
        status("interrupted: finished work is kept (label.py resumes it when rerun)")
        raise SystemExit(130)
    except BrokenPipeError:
        # Python's last flush of stdout would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141)
    except OSError as e:
        raise SystemExit(f"error: {e.filename}: {e.strerror or e}" if e.filename else f"error: {e}")


def status(*args):
    """Status lines go to stderr: stdout carries only the answer (or --json)."""
    print(*args, file=sys.stderr, flush=True)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows each flag's default, but never "None"."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parser(doc, *, pair=True, router=True, prompts=None, split="train", engine=False):
    """A parser whose --help keeps `doc`'s layout and shows defaults, with the shared flags (pair,
    router, device)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    if not pair:
        return p
    demo = os.path.join(DEMO, "{}")
    p.add_argument("--slm", default=demo.format("slm"), help="small model: hub name or folder")
    p.add_argument("--llm", default=demo.format("llm"), help="large model sharing its tokenizer")
    if router:
        p.add_argument("--router", default=demo.format("router"), help="router: folder or hub name")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda, else mps, else cpu)")
    dtypes = ["bfloat16", "float16", "float32"]
    p.add_argument("--dtype", choices=dtypes, help="default: bfloat16 on cuda, else float32")
    p.add_argument("--device-map", help="'auto' spreads the LLM (and a judge) over all GPUs")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw")
    if engine:
        p.add_argument(
            "--engine",
            choices=["eager", "fast"],
            help="eager (any batch size) or fast (static caches, CUDA graphs, batch size 1); "
            "default: fast where it pays and fits",
        )
    if prompts:
        where = ".txt, .json or .jsonl file, or hub dataset"
        p.add_argument("--prompts", default=demo.format(prompts), help=where)
        p.add_argument("--split", default=split, help="split of a hub dataset")
        p.add_argument("--prompt-field", default="prompt", help="field holding the prompt")
        p.add_argument("--answer-field", default="answer", help="field holding the final answer")
    return p


def check_args(args, **at_least):
    """What the shared flags and `at_least` (flag=minimum) allow, checked before any model loads;
    every float flag finite."""
    for flag, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise R2RError(
                f"--{flag.replace('_', '-')} must be finite, not {' '.join(map(str, values))}"
            )
    for flag, low in at_least.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            raise R2RError(f"--{flag.replace('_', '-')} must be at least {low}, not {value}")
    if getattr(args, "engine", None) == "fast" and getattr(args, "batch_size", 1) > 1:
        raise R2RError(
            "--engine fast decodes one prompt at a time: use --batch-size 1, or --engine eager"
        )
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        raise R2RError(
            f"--device {args.device}, but torch sees no CUDA GPU: leave --device out, or use a "
            "CUDA build of torch"
        )
    for flag in "slm llm router verifier prompts prompts_file".split():
        path = getattr(args, flag, None)
        if path and not os.path.exists(os.path.expanduser(path)) and not is_hub_name(path):
            raise R2RError(
                f"--{flag.replace('_', '-')} {path} does not exist: give an existing path or a "
                "hub name"
            )


def is_hub_name(path):
    """ "owner/name" or "name", but not "demo/slmm", a typo in an existing folder."""
    return HUB_NAME.fullmatch(path) is not None and not os.path.isdir(path.split("/")[0])


def check_writable(folder, flag):
    """Refuses now, in one line, an output folder this process could not write in: a temporary
    file in it, or in its nearest parent that exists (nothing is made before the work)."""
    at = os.path.abspath(folder)
    while not os.path.exists(at):
        at = os.path.dirname(at)
    try:
        tempfile.TemporaryFile(dir=at).close()
    except OSError as e:
        raise R2RError(f"cannot write to {folder}: {e.strerror.lower()}: choose another --{flag}")


# ----------------------------------------------------------------------------- files


def read_json(path, *keys):
    """The JSON object in the file `path`, with `keys`; else one line that names the file."""
    try:
        obj = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    # JSON and UTF-8 errors are ValueErrors.
    except (OSError, ValueError) as e:
        raise R2RError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}): make it again")
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise R2RError(f"{path} has no {', '.join(missing)}: from an older r2r? make it again")
    return obj


@contextlib.contextmanager
def atomic(path, suffix=".tmp"):
    """Writes the file or folder `path` whole: the block writes the path it is given (path +
    suffix), which then replaces `path`; after an error or Ctrl-C it is removed, not left behind."""
    tmp = f"{path}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- device and loading


def pick_device(device=None, dtype=None):
    """cuda, then mps, then cpu; bf16 on cuda, fp32 elsewhere. Says what it chose."""
    if device is None:
        mps = torch.backends.mps.is_available()
        device = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    # cuDNN's attention (SDPA's pick on Hopper) plans anew for every length.
    if device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    status(f"device {device}, dtype {dtype}")
    return torch.device(device), getattr(torch, dtype)


def peak_memory_gib(device):
    """Peak memory since torch.cuda.reset_peak_memory_stats(), over the GPUs; else the process's
    peak RSS so far."""
    if device.type == "cuda":
        peak = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        return peak / 2**30
    # Linux reports KiB, macOS (where mps runs) bytes.
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**30


def elapsed(t0, device):
    """Seconds since perf_counter() gave t0, read once the GPU has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def from_pretrained(loader, path, **kw):
    """loader.from_pretrained(path) for a local folder or a hub name; errors in one line."""
    try:
        return loader.from_pretrained(os.path.expanduser(path), **kw)
    # A damaged tokenizer.json is a ValueError, damaged weights a SafetensorError.
    except (OSError, ValueError, SafetensorError) as e:
        why = str(e).splitlines()[0]
        why = f"damaged .safetensors weights: {why}" if isinstance(e, SafetensorError) else why
        fix = "offline, only folders and cached models load"
        fix = "save or download it again" if os.path.isdir(os.path.expanduser(path)) else fix
        raise R2RError(f"cannot load {path} ({why}): {fix}")


def load_tokenizer(path):
    return from_pretrained(AutoTokenizer, path)


def load_model(path, device="cpu", dtype=torch.float32, *, device_map=None):
    """A model in eval mode on `device`, or spread over the GPUs by accelerate (device_map auto)."""
    model = from_pretrained(AutoModelForCausalLM, path, dtype=dtype, device_map=device_map)
    return (model if device_map else model.to(device)).eval()


def load_pair(slm_path, llm_path, device="cpu", dtype=torch.float32, *, device_map=None):
    """SLM, LLM and their shared tokenizer. Only the tokenizer's ids are compared: the models may
    have more output rows (Qwen2.5-0.5B has 151936, -7B 152064)."""
    tok = load_tokenizer(slm_path)
    llm_tok = load_tokenizer(llm_path)
    # All but the EOS make a prompt's ids.
    for what in ("vocab", "chat_template", "bos_token", "eos_token"):
        if getattr(tok, what) != getattr(llm_tok, what):
            say = f"the {what.replace('_', ' ')}s of {slm_path} and {llm_path} differ"
            if what != "eos_token":
                raise R2RError(
                    f"{say}: R2R needs an SLM and LLM that share one tokenizer (Qwen3-0.6B, -8B)"
                )
            status(
                f"warning: {say}; responses stop at the SLM's {tok.eos_token} and the configs' "
                "EOS ids"
            )
    slm = load_model(slm_path, device, dtype)
    llm = load_model(llm_path, device, dtype, device_map=device_map)
    for m, p in ((slm, slm_path), (llm, llm_path)):
        if m.config.get_text_config().vocab_size < len(tok):
            raise R2RError(f"{p} has fewer output rows than its tokenizer has ids ({len(tok)})")
        n = rope_limit(m.config)
        if n and n < getattr(m.config.get_text_config(), "max_position_embeddings", n + 1):
            status(f"note: {p} switches its RoPE factors after {n} positions; r2r stops there")
    return slm, llm, tok


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def fingerprint(slm, tok):
    """What identifies a router's SLM to anyone (never a local path): its hub or folder name,
    sizes, and a hash of the sign bits of its first embedding rows, which no dtype cast flips
    (fp16 rounds -1e-9 to -0.0)."""
    rows = slm.get_input_embeddings().weight[:8].detach().cpu()
    signs = (~torch.signbit(rows)).numpy().tobytes()
    name = slm.name_or_path
    return dict(
        name=os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name,
        hidden_size=slm.config.get_text_config().hidden_size,
        vocab=len(tok),
        embedding_sha=hashlib.sha256(signs).hexdigest()[:16],
    )


def read_router_config(path):
    """A router's config.json, checked before any model loads: a folder's, or a hub name's from
    its cache or the hub (neither: None, and load_router says why)."""
    try:
        folder = os.path.expanduser(path)
        file = os.path.join(folder, "config.json")
        file = file if os.path.isdir(folder) else hf_hub_download(path, "config.json")
    except (OSError, ValueError):
        return None
    keys = ("hidden_size", "top_k", "width", "n_blocks", "dropout", "threshold", "slm")
    config = read_json(file, *keys)
    for key in keys:
        value = config[key]
        number = type(value) in (int, float)
        want, ok = {
            "dropout": ("a number in [0, 1)", number and 0 <= value < 1),
            "threshold": ("a number in [0, 1]", number and 0 <= value <= 1),
            "slm": ("an object (the SLM's fingerprint)", isinstance(value, dict)),
        }.get(key, ("an integer >= 1", type(value) is int and value >= 1))
        if not ok:
            raise R2RError(f"{file}: {key} must be {want}, not {value!r}: train the router again")
    return config


def load_router(path, slm, tok, device="cpu"):
    """Router.from_pretrained (a folder or a hub name) on `device`, checked against this SLM."""
    try:
        # huggingface_hub prints a status line, and stdout may be --json.
        with contextlib.redirect_stdout(sys.stderr):
            router = Router.from_pretrained(path, map_location="cpu", strict=True)
    # Hub errors are OSErrors.
    except (OSError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        raise R2RError(
            f"cannot load the router {path} ({str(e).splitlines()[0]}): give a folder written by "
            "train_router.py or a hub name"
        )
    have = dict(router.config.get("slm") or {}, hidden_size=router.config["hidden_size"])
    want = fingerprint(slm, tok)
    for key in ("hidden_size", "vocab"):
        if have.get(key) != want[key]:
            raise R2RError(
                f"the router {path} was trained for an SLM with {key} {have.get(key)}, but "
                f"{want['name']} has {want[key]}: train a router for this SLM"
            )
    if have.get("embedding_sha") != want["embedding_sha"]:
        which = f"{have.get('name')}, not for {want['name']}"
        if have.get("name") == want["name"]:
            which = f"an SLM named {want['name']} with other weights"
        status(
            f"warning: the router {path} was trained for {which} (embedding hash "
            f"{have.get('embedding_sha')}, this SLM's {want['embedding_sha']})"
        )
    # The mixin's map_location places the weights it reads, not the module.
    return router.to(device).eval()


# ----------------------------------------------------------------------------- prompts


def read_prompts(source, split="train", prompt_field="prompt", answer_field="answer", limit=None):
    """Rows {"prompt", "answer" (or None)} from a .txt (a prompt a line), .json (objects) or
    .jsonl file, or a hub dataset."""
    try:
        if os.path.isfile(source):
            rows = read_file(source, prompt_field)
        else:
            import datasets

            datasets.disable_progress_bars()
            ds = datasets.load_dataset(source, split=split)
            rows = ds.select(range(min(limit or len(ds), len(ds)))).to_list()
    # JSON and UTF-8 errors are ValueErrors.
    except (OSError, ValueError, ConnectionError) as e:
        why = str(e).splitlines()[0]
        why = "not a UTF-8 text file" if isinstance(e, UnicodeDecodeError) else why
        raise R2RError(
            f"cannot read prompts from {source} ({why}): give a .txt (one prompt per line), "
            ".json or .jsonl file, or a HuggingFace dataset"
        )
    rows = rows[:limit] if limit else rows
    for i, r in enumerate(rows, 1):
        text = r.get(prompt_field) if isinstance(r, dict) else None
        if not isinstance(text, str) or not text.strip():
            fields = ", ".join(r) if isinstance(r, dict) else "-"
            raise R2RError(
                f"{source} row {i} has no text in a field '{prompt_field}' (fields: {fields}): "
                "fill or delete it, or set --prompt-field"
            )
    if not rows:
        raise R2RError(f"{source} holds no prompts")
    answers = [r.get(answer_field) for r in rows]
    answers = [a if a is None else str(a) for a in answers]
    return [dict(prompt=r[prompt_field], answer=a) for r, a in zip(rows, answers)]


def read_file(path, prompt_field):
    """A local prompts file as a list of rows, blank lines skipped; a ValueError says what is
    wrong."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    if path.endswith(".txt"):
        return [{prompt_field: line} for line in text.splitlines() if line.strip()]
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    # JSON lines, also under .json.
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except ValueError as e:
            raise ValueError(f"line {n} is not JSON: {e}")
    return rows


def encode_prompt(tok, text, chat=True, *, thinking=None):
    """Token ids of a user prompt, or of a conversation (a list of {"role", "content"} messages),
    through the tokenizer's chat template where it has one; thinking=False turns a template's
    enable_thinking off (Qwen3 thinks first by default)."""
    if chat and tok.chat_template:
        switch = {} if thinking is None else {"enable_thinking": thinking}
        messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, **switch
        )
        return list(ids["input_ids"])
    return tok.encode(text)
