"""
r2r.py: R2R ("Roads to Rome", arXiv 2505.21600) and what the scripts share. Top to bottom: the router's
features, the router and its baselines, the four steps of mixed decoding and the loop over them (batch size 1,
then batched); then the plumbing. fast.py runs the loop's seam on CUDA graphs. No labeling, training or reports.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache


class R2RError(Exception):
    """Bad input: the scripts print its message as one line and exit with status 1."""


# ----------------------------------------------------------------------------- features and the router


def forward(model, ids, cache=None, *, last=False, **kw):
    """One pass over `ids` (B, T) extending `cache` (`kw`: padded batches' mask, positions) -> the last hidden state
    (B, T, H) and logits (B, T, V), or with last=True (B, 1, V): a 4K-token prefill's T x V costs gigabytes."""
    ids, kw = (
        ids.to(model.device),
        {k: v.to(model.device) for k, v in kw.items()},
    )  # SLM and LLM may differ
    out = model.base_model(
        input_ids=ids, cache=cache, use_cache=cache is not None, **kw
    )  # not every layer's
    hidden = out.last_hidden_state  # (B, T, H)
    return hidden, model.get_output_embeddings()(hidden[:, -1:] if last else hidden)


def router_inputs(slm, hidden, logits, tokens, k):
    """The router's features (Stage 2), for labels and decoding alike: SLM hidden state (N, H), sorted top-k logits
    (N, k), and the SLM's input embedding of the token it is about to emit (N, H)."""
    topk = logits.float().topk(k, dim=-1).values  # (N, k)
    return hidden.float(), topk, slm.get_input_embeddings()(tokens).float()


class Block(nn.Module):
    """Pre-norm residual MLP block: x + Dropout(W2 GELU(W1 LayerNorm(x)))."""

    def __init__(self, width, dropout):
        super().__init__()
        self.norm, self.up, self.down = (
            nn.LayerNorm(width),
            nn.Linear(width, 4 * width),
            nn.Linear(4 * width, width),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class Router(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="r2r",
    paper_url="https://arxiv.org/abs/2505.21600",
):
    """Scores an SLM step; high means "the LLM writes this token" (R2R Stage 2; the authors: 6 blocks of 1024, 56M
    parameters). The hub mixin: save_pretrained/push_to_hub/from_pretrained, model.safetensors + config.json."""

    def __init__(
        self, hidden_size, top_k=100, width=128, n_blocks=2, dropout=0.1, threshold=0.5, slm=None
    ):
        super().__init__()
        self.config = dict(
            hidden_size=hidden_size,
            top_k=top_k,
            width=width,
            n_blocks=n_blocks,
            dropout=dropout,
            threshold=threshold,
            slm=slm,
        )
        self._hub_mixin_config = (
            self.config
        )  # one dict, so a threshold set after training is saved too
        self.logit_proj = nn.Linear(top_k, hidden_size)
        self.norm = nn.LayerNorm(
            3 * hidden_size
        )  # hidden states and logits live on very different scales
        self.inp = nn.Linear(3 * hidden_size, width)
        self.blocks = nn.Sequential(*[Block(width, dropout) for _ in range(n_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))

    @property
    def threshold(self):
        return self.config["threshold"]

    def forward(self, hidden, topk, emb):
        """(N, H), (N, k), (N, H) -> (N,) logits; sigmoid gives the routing score."""
        x = torch.cat([hidden, self.logit_proj(topk), emb], dim=-1)  # (N, 3H)
        return self.out(self.blocks(self.inp(self.norm(x)))).squeeze(-1)

    @classmethod
    def _load_as_pickle(cls, model, model_file, map_location, strict):
        raise R2RError(
            f"{model_file}: r2r loads routers only from model.safetensors, never pickled weights"
        )


class ConfidenceRouter(nn.Module):
    """The authors' baselines: route by SLM entropy, by low top-1 probability, or at random, read
    off the top-k logits (exact when k covers the vocabulary). Router's interface."""

    def __init__(self, kind, top_k, threshold=0.5, generator=None):
        super().__init__()
        self.kind, self.generator = kind, generator
        self.config = dict(top_k=top_k, threshold=threshold)

    threshold = Router.threshold

    def forward(self, hidden, topk, emb):
        return torch.logit(confidence_scores(topk, self.generator)[self.kind], eps=1e-6)


def confidence_scores(topk, generator=None):
    """(N, k) top-k logits -> scores in [0, 1], higher = less sure: normalised entropy,
    1 - top-1 probability, and a uniform random draw."""
    logp = F.log_softmax(topk.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1) / math.log(topk.shape[-1])
    return dict(
        entropy=entropy.clamp(0, 1),
        top1=1 - logp[:, 0].exp(),
        random=torch.rand(topk.shape[0], generator=generator, device=topk.device),
    )


# ----------------------------------------------------------------------------- the four steps and the loop


def slm_step(slm, fresh, cache, V, **kw):
    """Step 1: the SLM reads the tokens it has not seen, `fresh` (B, T): the prompts, then each
    committed token (`kw`: mask and positions of a padded batch). -> hidden (B, H), logits (B, V)."""
    hidden, logits = forward(slm, fresh, cache, last=True, **kw)
    return hidden[:, -1], logits[:, -1, :V]


def route(router, slm, hidden, logits, tokens, threshold):
    """Step 2: which candidates `tokens` (B,) go to the LLM? (B,) bools. The router decides before
    any cache has seen the token, which is why R2R never rolls back."""
    scores = torch.sigmoid(
        router(*router_inputs(slm, hidden, logits, tokens, router.config["top_k"]))
    )
    return scores.to(torch.float32 if scores.device.type == "mps" else torch.float64) >= threshold


def catch_up(llm, gap, cache, **kw):
    """Step 3, R2R's catch-up (Stage 3): ONE LLM pass over every token committed since its last
    call, `gap` (B, T_gap), a prefill of the gap. -> its next-token logits (B, V)."""
    return forward(llm, gap, cache, last=True, **kw)[1][:, -1]


def sample(logits, temperature, top_p, u):
    """Tokens (B,) from logits (B, V): argmax at temperature 0, else where the top-p CDF reaches u (B,); no sync."""
    if temperature == 0:
        return logits.argmax(-1)
    p, idx = F.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True)  # (B, V)
    p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0)  # the smallest prefix whose mass reaches top_p
    cdf = p.cumsum(-1)  # (B, V)
    j = torch.searchsorted(cdf, u[:, None].to(cdf) * cdf[:, -1:]).clamp(
        max=p.shape[-1] - 1
    )  # (B, 1)
    return idx.gather(-1, j)[:, 0]


def uniforms(generators, device):
    """One uniform draw per row (B,), row b from generators[b] (None: torch's own), on `device`."""
    return torch.cat(
        [torch.rand(1, generator=g, device=g.device if g else device) for g in generators]
    ).to(device)


def mean_catch_up(gaps):
    """Mean new tokens an LLM call read (its gap), leaving out a first call that read only the
    prompt: [0, 3, 5] -> 4.0. The one definition behind every "mean catch-up" r2r prints."""
    gaps = [g for g in gaps if g]
    return sum(gaps) / max(len(gaps), 1)


class Proposal(NamedTuple):
    """What steps 1-2 give the loop: the SLM's candidate and whether the router sends it to the LLM."""

    token: int
    routed: bool


@dataclass
class Trace:
    """One decode: new tokens, who wrote each (1 = LLM), the gap each LLM call read (new tokens
    only), seconds."""

    tokens: list = field(default_factory=list)
    from_llm: list = field(default_factory=list)
    gaps: list = field(default_factory=list)
    seconds: float = 0.0
    llm_read: int = 0  # new tokens the LLM had read at its last call

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
        """New tokens per LLM call, leaving out a first call that read only the prompt."""
        return mean_catch_up(self.gaps)

    def activated_params(self, p_slm, p_llm):
        """Average activated parameters per token, the authors' formula: (n_slm P_slm + n_llm P_llm) / n."""
        n_llm = sum(self.from_llm)
        return ((len(self.tokens) - n_llm) * p_slm + n_llm * p_llm) / max(len(self.tokens), 1)

    @classmethod
    def join(cls, traces):
        """Many decodes as one, for statistics over a whole run."""
        return cls(
            [t for x in traces for t in x.tokens],
            [f for x in traces for f in x.from_llm],
            [g for x in traces for g in x.gaps],
            sum(x.seconds for x in traces),
        )


class EagerEngine:
    """Steps 1-3 over two DynamicCaches: `decode` calls start(), propose() (1-2), catch_up() (3); fast.py too."""

    def __init__(self, slm, llm, tok):
        self.slm, self.llm = slm, llm
        self.vocab_size = len(tok)  # only the shared tokenizer's ids are ever compared or emitted
        models = [m for m in (slm, llm) if m is not None]
        # Stop ids: the tokenizer's EOS and every EOS id of the models' generation configs.
        eos = [tok.eos_token_id] + [m.generation_config.eos_token_id for m in models]
        self.eos = {i for e in eos if e is not None for i in ([e] if isinstance(e, int) else e)}
        # The most tokens (prompt + response) that every model can place.
        self.max_tokens = min(
            filter(
                None,
                (
                    getattr(m.config.get_text_config(), "max_position_embeddings", None)
                    for m in models
                ),
            ),
            default=sys.maxsize,
        )

    def start(
        self,
        router,
        prompt_ids,
        *,
        use_router,
        threshold,
        temperature,
        top_p,
        generator,
        max_new_tokens,
    ):
        """A new prompt: empty caches (they grow as needed), and how steps 1-3 decide and pick."""
        self.slm_cache, self.llm_cache = DynamicCache(), DynamicCache()
        self.router, self.use_router, self.threshold = router, use_router, threshold
        self.temperature, self.top_p = temperature, top_p
        self.uniforms = lambda device: (
            uniforms([generator], device) if temperature else None
        )  # (1,) or greedy

    def propose(self, fresh):
        """Steps 1-2: the SLM reads the token ids `fresh` and proposes a candidate; the router decides."""
        hidden, logits = slm_step(
            self.slm, torch.tensor([fresh]), self.slm_cache, self.vocab_size
        )  # (1, H), (1, V)
        token = sample(logits, self.temperature, self.top_p, self.uniforms(logits.device))  # (1,)
        routed = (
            self.use_router
            and route(self.router, self.slm, hidden, logits, token, self.threshold).item()
        )
        return Proposal(token.item(), routed)

    def catch_up(self, gap):
        """Step 3: the LLM reads the token ids `gap` in one pass and writes the next token."""
        logits = catch_up(self.llm, torch.tensor([gap]), self.llm_cache)[
            :, : self.vocab_size
        ]  # (1, V)
        return sample(logits, self.temperature, self.top_p, self.uniforms(logits.device)).item()


def decode_defaults(engine, router, threshold, eos):
    """The loops' defaults, in one place: the router's saved threshold, the engine's stop ids."""
    threshold = router.threshold if threshold is None and router is not None else threshold
    return threshold, engine.eos if eos is None else eos


def room(engine, prompt_ids, max_new_tokens):
    """New tokens a prompt may get: max_new_tokens, or fewer where the models' positions end."""
    if len(prompt_ids) >= engine.max_tokens:
        raise R2RError(
            f"a prompt of {len(prompt_ids)} tokens leaves no room in the models' {engine.max_tokens} "
            "positions: shorten it"
        )
    return min(max_new_tokens, engine.max_tokens - len(prompt_ids))


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
    """R2R's mixed decoding (Stage 3) of one prompt over `engine` -> Trace; mode "slm"/"llm" sends every token to one
    model. After n commits the SLM cache holds prompt + n-1 new tokens (it reads the last next step), the LLM cache
    prompt + new tokens up to its last call, `gap` the rest: no cache holds an uncommitted token, nothing rolls
    back. Stops after an id in `eos` (default: the engine's), max_new_tokens or the last position. After each step:
    on_step(slm_cache, llm_cache, [trace]), for streaming and tests."""
    threshold, eos = decode_defaults(engine, router, threshold, eos)
    n_new = room(engine, prompt_ids, max_new_tokens)
    engine.start(
        router,
        prompt_ids,
        use_router=mode == "r2r",
        threshold=threshold,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        max_new_tokens=n_new,
    )
    trace = Trace()
    # The SLM reads `fresh` at its next step; the LLM reads `gap` at its next call.
    fresh, gap = list(prompt_ids), list(prompt_ids)
    t0 = time.perf_counter()
    for _ in range(n_new):
        # 1.-2. The SLM reads what it has not seen and proposes a candidate; the router decides.
        token, routed = engine.propose(fresh) if mode != "llm" else Proposal(None, True)
        # 3. Routed: the LLM catches up on the gap in one pass, and its token replaces the candidate.
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


# ----------------------------------------------------------------------------- the batched loop


class Row(NamedTuple):
    """One prompt of a batched decode: its trace, its generator, the new tokens it may get."""

    trace: Trace
    generator: torch.Generator | None
    room: int


@dataclass
class BatchTrace:
    """A batched decode: a Trace per row, its steps, the new tokens each batched LLM call read, seconds."""

    traces: list
    steps: int = 0
    gaps: list = field(default_factory=list)
    seconds: float = 0.0


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
):
    """`decode` for B prompts over an engine's models: steps 1-4 with a batch dimension -> BatchTrace. What
    differs: each live row commits one token a step, so all rows have read equally many columns, and when ANY
    row is routed one catch-up (B, gap) serves the batch (a step calls the LLM with probability 1-(1-s)^B at
    share s); routed rows take the LLM's token. Prompts are left-padded to T columns (masked; positions count
    each row's own tokens); a row that stops leaves the batch and both caches, so after step n the SLM cache
    holds T + n - 1 columns. Row b draws from generators[b] in decode's order, so its Trace equals its batch-1.
    stop(trace) -> True also ends a row (a server's stop strings, a client gone)."""
    threshold, eos = decode_defaults(engine, router, threshold, eos)
    slm, llm, V = engine.slm, engine.llm, engine.vocab_size
    B, T, dev = len(prompts), max(map(len, prompts)), llm.device
    ids = torch.tensor(
        [[0] * (T - len(p)) + list(p) for p in prompts], device=dev
    )  # (B, T), left-padded
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=dev)  # (B, T)
    pos = (mask.cumsum(-1) - 1).clamp(
        min=0
    )  # (B, T): each token's index in its own row, 0 on padding
    slm_cache, llm_cache = DynamicCache(), DynamicCache()
    live = [
        Row(Trace(), g, room(engine, p, max_new_tokens))
        for p, g in zip(prompts, generators or [None] * B)
    ]
    batch, t0 = BatchTrace([row.trace for row in live]), time.perf_counter()
    for n in range(max_new_tokens):
        # 1. SLM step over the columns it has not read: a candidate per live row.
        tokens = [None] * len(live)
        if mode != "llm":
            s = slm_cache.get_seq_length()
            hidden, logits = slm_step(
                slm, ids[:, s:], slm_cache, V, attention_mask=mask, position_ids=pos[:, s:]
            )
            u = uniforms([row.generator for row in live], logits.device) if temperature else None
            candidates = sample(logits, temperature, top_p, u)  # (b,)
            tokens = candidates.tolist()
        # 2. Route each row.
        routed = (
            route(router, slm, hidden, logits, candidates, threshold).tolist()
            if mode == "r2r"
            else [mode == "llm"] * len(live)
        )
        # 3. One LLM catch-up for the whole batch; only the routed rows take its token.
        if any(routed):
            s = llm_cache.get_seq_length()
            batch.gaps.append(ids.shape[1] - max(s, T))
            logits = catch_up(
                llm, ids[:, s:], llm_cache, attention_mask=mask, position_ids=pos[:, s:]
            )  # (b, V)
            rows = [i for i, r in enumerate(routed) if r]
            u = uniforms([live[i].generator for i in rows], logits.device) if temperature else None
            for i, token in zip(rows, sample(logits[rows, :V], temperature, top_p, u).tolist()):
                tokens[i] = token
        # 4. Commit. A row that stops leaves the batch and both caches, so the rest stop paying for it.
        ids = torch.cat([ids, torch.tensor(tokens, device=dev)[:, None]], dim=1)  # (b, T + n + 1)
        mask = F.pad(mask, (0, 1), value=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)  # (b, T + n + 1)
        batch.steps, now = n + 1, elapsed(t0, dev)
        for row, token, r in zip(live, tokens, routed):
            row.trace.commit(token, r)
            row.trace.seconds = now
        keep = [
            i
            for i, row in enumerate(live)
            if row.trace.tokens[-1] not in eos
            and len(row.trace.tokens) < row.room
            and not (stop and stop(row.trace))
        ]
        if len(keep) < len(live):
            idx = torch.tensor(
                keep, dtype=torch.long
            )  # on the CPU: it indexes caches on any device (device_map)
            ids, mask, pos, live = ids[idx], mask[idx], pos[idx], [live[i] for i in keep]
            slm_cache.batch_select_indices(idx)
            llm_cache.batch_select_indices(idx)
        if on_step is not None:
            on_step(slm_cache, llm_cache, [row.trace for row in live])
        if not live:
            break
    batch.seconds = elapsed(t0, dev)
    return batch


# ============================================================ plumbing: command line, device, loading, prompts

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
HUB_NAME = re.compile(
    r"(?!.*\.(txt|jsonl?)$)\w[\w.-]*(/\w[\w.-]*)?"
)  # "owner/name" or "name", not "x.jsonl"


def run_main(main):
    """Run a script's main(); bad input becomes one line on stderr, never a traceback."""
    try:
        main()
    except R2RError as e:
        raise SystemExit(f"error: {e}")


def status(*args):
    """Status lines go to stderr: stdout carries only the answer (or --json)."""
    print(*args, file=sys.stderr, flush=True)


def parser(doc, *, pair=True, router=True, prompts=None, split="train", engine=False):
    """A parser whose --help keeps `doc`'s layout and shows defaults, with the shared flags (pair, router, device)."""
    p = argparse.ArgumentParser(
        description=doc,
        formatter_class=type(
            "Help",
            (  # no "(default: None)"
                argparse.RawDescriptionHelpFormatter,
                argparse.ArgumentDefaultsHelpFormatter,
            ),
            {
                "_get_help_string": lambda self, a: (
                    a.help
                    if a.default is None
                    else argparse.ArgumentDefaultsHelpFormatter._get_help_string(self, a)
                )
            },
        ),
    )
    if not pair:
        return p
    p.add_argument(
        "--slm", default=os.path.join(DEMO, "slm"), help="small model: hub name or local folder"
    )
    p.add_argument(
        "--llm", default=os.path.join(DEMO, "llm"), help="large model sharing the SLM's tokenizer"
    )
    if router:
        p.add_argument(
            "--router", default=os.path.join(DEMO, "router"), help="router folder or hub name"
        )
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda, else mps, else cpu)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 on cuda, else fp32",
    )
    p.add_argument(
        "--device-map",
        help="'auto' spreads the LLM (and a judge) over every visible GPU (accelerate)",
    )
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed prompts raw, without the chat template",
    )
    if engine:
        p.add_argument(
            "--engine",
            choices=["eager", "fast"],
            help="eager (any batch size) or fast (static caches, "
            "CUDA graphs, batch size 1); default: fast where it pays and fits",
        )
    if prompts:
        p.add_argument(
            "--prompts",
            default=os.path.join(DEMO, prompts),
            help=".txt, .json, .jsonl file or hub dataset",
        )
        p.add_argument("--split", default=split, help="split of a hub dataset")
        p.add_argument("--prompt-field", default="prompt", help="field holding the prompt")
        p.add_argument("--answer-field", default="answer", help="field holding the final answer")
    return p


def check_args(args, **at_least):
    """What the shared flags and `at_least` (flag=minimum) allow, checked before any model loads."""
    for flag, low in at_least.items():
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            raise R2RError(
                f"--{flag.replace('_', '-')} must be at least {low}, not {getattr(args, flag)}"
            )
    if getattr(args, "engine", None) == "fast" and getattr(args, "batch_size", 1) > 1:
        raise R2RError(
            "--engine fast decodes one prompt at a time: use --batch-size 1, or --engine eager"
        )
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        raise R2RError(
            f"--device {args.device}, but torch sees no CUDA GPU: leave --device out, or use a CUDA torch"
        )
    for flag, path in (
        (f, getattr(args, f, None)) for f in "slm llm router verifier prompts prompts_file".split()
    ):
        if (
            path
            and not os.path.exists(os.path.expanduser(path))
            and (  # "demo/slmm" is a typo, not a hub name
                not HUB_NAME.fullmatch(path) or os.path.isdir(path.split("/")[0])
            )
        ):
            raise R2RError(
                f"--{flag.replace('_', '-')} {path} does not exist: give an existing path or a hub name"
            )


def note_cut(engine, traces, rooms, max_new_tokens):
    """After decoding: one note if a response stopped at the models' positions (its room), not at a stop id."""
    if any(
        len(t.tokens) == r < max_new_tokens and t.tokens[-1] not in engine.eos
        for t, r in zip(traces, rooms)
    ):
        status(
            f"note: responses stop at the models' {engine.max_tokens} positions, before {max_new_tokens} new tokens"
        )


def pick_device(device=None, dtype=None):
    """cuda, then mps, then cpu; bf16 on cuda, fp32 elsewhere. Says what it chose."""
    device = device or (
        "cuda"
        if torch.cuda.is_available()
        else "mps"
        if torch.backends.mps.is_available()
        else "cpu"
    )
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if device.startswith(
        "cuda"
    ):  # cuDNN's attention (SDPA's pick on Hopper) plans anew for every length
        torch.backends.cuda.enable_cudnn_sdp(False)
    status(f"device {device}, dtype {dtype}")
    return torch.device(device), getattr(torch, dtype)


def elapsed(t0, device):
    """Seconds since perf_counter() gave t0, read once the GPU has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def from_pretrained(loader, path, **kw):
    """loader.from_pretrained(path) for a local folder or a hub name; errors in one line."""
    try:
        return loader.from_pretrained(os.path.expanduser(path), **kw)
    except OSError as e:
        raise R2RError(
            f"cannot load {path} ({str(e).splitlines()[0]}); offline, only folders and cached models load"
        )


def load_tokenizer(path):
    return from_pretrained(AutoTokenizer, path)


def load_model(path, device="cpu", dtype=torch.float32, *, device_map=None):
    """A model in eval mode on `device`, or spread over the GPUs by accelerate (device_map="auto")."""
    model = from_pretrained(AutoModelForCausalLM, path, dtype=dtype, device_map=device_map)
    return (model if device_map else model.to(device)).eval()


def load_pair(slm_path, llm_path, device="cpu", dtype=torch.float32, *, device_map=None):
    """SLM, LLM, their shared tokenizer; only its ids are compared (Qwen2.5-0.5B: 151936 lm_head rows, -7B: 152064)."""
    tok, llm_tok = load_tokenizer(slm_path), load_tokenizer(llm_path)
    for what in (
        "vocab",
        "chat_template",
        "bos_token",
        "eos_token",
    ):  # all but the EOS make the prompt's ids
        if getattr(tok, what) != getattr(llm_tok, what):
            say = f"the {what.replace('_', ' ')}s of {slm_path} and {llm_path} differ"
            if what != "eos_token":
                raise R2RError(
                    f"{say}: R2R needs an SLM and LLM that share one tokenizer (e.g. Qwen3-0.6B, -8B)"
                )
            status(
                f"warning: {say}; responses stop at the SLM's {tok.eos_token} and the configs' EOS ids"
            )
    slm, llm = (
        load_model(slm_path, device, dtype),
        load_model(llm_path, device, dtype, device_map=device_map),
    )
    for m, p in ((slm, slm_path), (llm, llm_path)):
        if m.config.get_text_config().vocab_size < len(tok):
            raise R2RError(f"{p} has fewer output rows than its tokenizer has ids ({len(tok)})")
    return slm, llm, tok


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def fingerprint(slm, tok):
    """What identifies a router's SLM to anyone (never a local path): its hub or folder name, sizes, and a hash
    of the sign bits of its first embedding rows, which no dtype cast flips (fp16 rounds -1e-9 to -0.0)."""
    signs = (~torch.signbit(slm.get_input_embeddings().weight[:8].detach().cpu())).numpy().tobytes()
    name = (
        os.path.basename(os.path.normpath(slm.name_or_path))
        if os.path.isdir(slm.name_or_path)
        else slm.name_or_path
    )
    return dict(
        name=name,
        hidden_size=slm.config.get_text_config().hidden_size,
        vocab=len(tok),
        embedding_sha=hashlib.sha256(signs).hexdigest()[:16],
    )


def load_router(path, slm, tok, device="cpu"):
    """Router.from_pretrained (a folder or a hub name) on `device`, checked against this SLM."""
    try:
        with contextlib.redirect_stdout(
            sys.stderr
        ):  # huggingface_hub prints a status line; stdout may be --json
            router = Router.from_pretrained(path, map_location="cpu", strict=True)
    except (OSError, TypeError, ValueError, RuntimeError) as e:  # hub errors are OSErrors
        raise R2RError(
            f"cannot load the router {path} ({str(e).splitlines()[0]}): give a folder written by "
            "train_router.py or a hub name"
        )
    have, want = (
        dict(router.config.get("slm") or {}, hidden_size=router.config["hidden_size"]),
        fingerprint(slm, tok),
    )
    for key in ("hidden_size", "vocab"):
        if have.get(key) != want[key]:
            raise R2RError(
                f"the router {path} was trained for an SLM with {key} {have.get(key)}, but {want['name']} "
                f"has {want[key]}: train a router for this SLM"
            )
    if have.get("embedding_sha") != want["embedding_sha"]:
        status(
            f"warning: the router {path} was trained for {have.get('name')}, not for {want['name']}"
        )
    return router.to(
        device
    ).eval()  # the mixin's map_location places the weights it reads, not the module


def read_prompts(source, split="train", prompt_field="prompt", answer_field="answer", limit=None):
    """Rows {"prompt", "answer" (or None)}: a .txt (a prompt a line), .json (objects), .jsonl file or hub dataset."""
    try:
        if os.path.isfile(source):
            rows = read_file(source, prompt_field)
        else:
            import datasets

            datasets.disable_progress_bars()
            ds = datasets.load_dataset(source, split=split)
            rows = ds.select(range(min(limit or len(ds), len(ds)))).to_list()
    except (OSError, ValueError, ConnectionError) as e:  # JSON and UTF-8 errors are ValueErrors
        why = (
            "not a UTF-8 text file" if isinstance(e, UnicodeDecodeError) else str(e).splitlines()[0]
        )
        raise R2RError(
            f"cannot read prompts from {source} ({why}): give a .txt (one prompt per line), .json or "
            ".jsonl file, or a HuggingFace dataset"
        )
    rows = rows[:limit] if limit else rows
    for i, r in enumerate(rows, 1):
        if (
            not isinstance(r, dict)
            or not isinstance(r.get(prompt_field), str)
            or not r[prompt_field].strip()
        ):
            raise R2RError(
                f"{source} row {i} has no text in a field '{prompt_field}' (fields: "
                f"{', '.join(r) if isinstance(r, dict) else '-'}): fill or delete it, or set --prompt-field"
            )
    if not rows:
        raise R2RError(f"{source} holds no prompts")
    return [
        {
            "prompt": r[prompt_field],
            "answer": None if r.get(answer_field) is None else str(r[answer_field]),
        }
        for r in rows
    ]


def read_file(path, prompt_field):
    """A local prompts file as a list of rows, blank lines skipped; a ValueError says what is wrong."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".txt"):
        return [{prompt_field: line} for line in text.splitlines() if line.strip()]
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):  # JSON lines, also under .json
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
        return list(
            tok.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **switch,
            )["input_ids"]
        )
    return tok.encode(text)
