"""
r2r.py: everything the R2R scripts share ("Roads to Rome", arXiv 2505.21600).

label.py, train_router.py, generate.py, evaluate.py and bench.py import this module and
nothing else of ours.
Read top to bottom, it is the method first: the model steps and the router's features, the
router (an MLP) and its baselines, the mixed decoding loop (eager, batched, and the fast engine
over static caches and CUDA graphs). The plumbing comes last: the
command line, device and dtype, loading a pair, prompts and the answer rule. It does not
label, train or print reports; the scripts do.
"""
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "owner/name" or "name" on the HuggingFace Hub


class R2RError(Exception):
    """Bad input: the scripts print its message as one line and exit with status 1."""

# ----------------------------------------------------------------------------- model steps

def forward(model, ids, cache=None, *, last=False, **kw):
    """One pass of `model` over `ids` (B, T), extending `cache` in place (`kw`: attention
    mask and position ids for padded batches). Returns the last hidden state (B, T, H),
    i.e. the vector lm_head reads, after the final norm, and the logits (B, T, V), or only
    the last position's (B, 1, V) with `last=True`: a prefill or catch-up reads nothing
    else, and T x V logits of a 4K-token prompt would cost gigabytes. The hidden state
    comes from the base model: output_hidden_states=True would keep every layer."""
    ids, kw = ids.to(model.device), {k: v.to(model.device) for k, v in kw.items()}  # the SLM and LLM may differ
    out = model.base_model(input_ids=ids, past_key_values=cache, use_cache=cache is not None, **kw)
    hidden = out.last_hidden_state  # (B, T, H)
    return hidden, model.get_output_embeddings()(hidden[:, -1:] if last else hidden)


def router_inputs(slm, hidden, logits, tokens, k):
    """The router's features (R2R Stage 2): SLM hidden state (N, H), its top-k logits
    sorted descending (N, k), and the SLM's own input embedding of the token it is about to
    emit (N, H). The one definition used teacher-forced (label.py) and step by step
    (generate), so the router sees the same features in training and at inference."""
    topk = logits.float().topk(k, dim=-1).values  # (N, k)
    return hidden.float(), topk, slm.get_input_embeddings()(tokens).float()


def sample(logits, temperature, top_p, u):
    """Next tokens from logits (B, V): the argmax at temperature 0, else nucleus sampling,
    row b taking the token where the cumulative probability of the top-p tokens reaches u[b]
    (uniforms (B,)) times their mass.
    Tensors in and out, no read by the host: the fast engine runs it inside a CUDA graph."""
    if temperature == 0:
        return logits.argmax(-1)
    p, idx = F.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True)  # (B, V)
    p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0)  # keep the smallest prefix whose mass reaches top_p
    cdf = p.cumsum(-1)  # (B, V)
    j = torch.searchsorted(cdf, u[:, None].to(cdf) * cdf[:, -1:]).clamp(max=p.shape[-1] - 1)  # (B, 1)
    return idx.gather(-1, j)[:, 0]


def uniform(generator, device):
    """One uniform draw (1,) from `generator` (None: torch's own), moved to `device`."""
    return torch.rand(1, generator=generator, device=generator.device if generator else device).to(device)

# ----------------------------------------------------------------------------- the router

class Block(nn.Module):
    """Pre-norm residual MLP block: x + Dropout(W2 GELU(W1 LayerNorm(x)))."""

    def __init__(self, width, dropout):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class Router(nn.Module, PyTorchModelHubMixin, library_name="r2r", paper_url="https://arxiv.org/abs/2505.21600"):
    """Scores one SLM step; a high score means "the LLM should write this token"
    (R2R Stage 2). The authors use 6 blocks of width 1024 (about 56M parameters);
    our defaults are far smaller and suit the demo pair. huggingface_hub's mixin gives
    save_pretrained / push_to_hub / from_pretrained (a folder or a hub name):
    model.safetensors plus config.json holding the arguments below."""

    def __init__(self, hidden_size, top_k=100, width=128, n_blocks=2, dropout=0.1, threshold=0.5, slm=None):
        super().__init__()
        self.config = dict(hidden_size=hidden_size, top_k=top_k, width=width, n_blocks=n_blocks,
                           dropout=dropout, threshold=threshold, slm=slm)
        self._hub_mixin_config = self.config  # one dict, so a threshold set after training is saved too
        self.logit_proj = nn.Linear(top_k, hidden_size)
        self.norm = nn.LayerNorm(3 * hidden_size)  # hidden states and logits live on very different scales
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
        raise R2RError(f"{model_file}: r2r loads routers only from model.safetensors, never pickled weights")


class ConfidenceRouter(nn.Module):
    """The baselines the authors compare: route by SLM entropy, by low top-1 probability,
    or at random, all read off the top-k logits (exact when k covers the vocabulary).
    Same interface as Router, so every tool can swap one for the other."""

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
    rand = torch.rand(topk.shape[0], generator=generator, device=topk.device)
    return dict(entropy=entropy.clamp(0, 1), top1=1 - logp[:, 0].exp(), random=rand)


def fingerprint(slm, tok):
    """What a router must match in its SLM: hidden size and vocabulary, plus a hash of the
    embedding table's first rows, which tells two SLMs of one shape apart."""
    emb = slm.get_input_embeddings().weight[:8].detach().float().cpu().numpy().round(3).tobytes()
    return dict(name=slm.config.name_or_path, hidden_size=slm.config.get_text_config().hidden_size,
                vocab=len(tok), embedding_sha=hashlib.sha256(emb).hexdigest()[:16])


def save_router(router, folder):
    """router.save_pretrained(folder), atomically: a killed run never leaves half a router."""
    tmp = folder.rstrip("/") + ".tmp"
    router.save_pretrained(tmp)
    os.makedirs(folder, exist_ok=True)
    for name in ("model.safetensors", "README.md", "config.json"):  # config last: it marks a whole router
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    os.rmdir(tmp)


def load_router(path, slm, tok, device="cpu"):
    """Router.from_pretrained (a folder or a hub name), checked against this SLM."""
    if not os.path.isfile(os.path.join(path, "config.json")) and (os.path.exists(path) or not HUB_NAME.fullmatch(path)):
        raise R2RError(f"no router at {path}: train one with train_router.py or pass --router")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints a line; stdout may be --json
            router = Router.from_pretrained(path, map_location="cpu", strict=True)
    except (OSError, TypeError, ValueError, RuntimeError) as e:  # hub errors are OSErrors
        raise R2RError(f"cannot load the router {path} ({str(e).splitlines()[0]}): give a folder written by "
                       "train_router.py or a hub name")
    want = fingerprint(slm, tok)
    have = dict(router.config.get("slm") or {}, hidden_size=router.config["hidden_size"])  # its own input size
    for key in ("hidden_size", "vocab"):
        if have.get(key) != want[key]:
            raise R2RError(f"the router in {path} was trained for an SLM with {key} {have.get(key)}, "
                           f"but {want['name']} has {want[key]}: train a router for this SLM")
    if have.get("embedding_sha") != want["embedding_sha"]:
        print(f"warning: the router in {path} was trained for {have.get('name')}, not {want['name']}")
    return router.to(device).eval()  # the mixin's map_location places the weights it reads, not the module

# ----------------------------------------------------------------------------- mixed decoding

@dataclass
class Trace:
    """What one mixed decode did: the new tokens, which model wrote each (1 = LLM), and the
    number of new tokens each LLM call caught up on."""
    tokens: list = field(default_factory=list)
    from_llm: list = field(default_factory=list)
    catch_up: list = field(default_factory=list)
    seconds: float = 0.0


def slm_step(slm, fresh, cache, V, **kw):
    """Step 1 of the loop: the SLM reads the tokens it has not seen yet, `fresh` (B, T): the prompts,
    or the last committed tokens (`kw`: mask and positions of a padded batch). Returns its
    last hidden states (B, H) and logits (B, V)."""
    hidden, logits = forward(slm, fresh, cache, last=True, **kw)
    return hidden[:, -1], logits[:, -1, :V]


def route(router, slm, hidden, logits, tokens, threshold):
    """Step 2: which of the candidates `tokens` (B ints) does the router send to the LLM?
    B bools. It decides before any cache has seen the token, which is why R2R never rolls back."""
    feats = router_inputs(slm, hidden, logits, torch.tensor(tokens, device=slm.device), router.config["top_k"])
    return [score >= threshold for score in torch.sigmoid(router(*feats)).tolist()]


def catch_up(llm, pending, cache, **kw):
    """Step 3, R2R's batched catch-up (R2R Stage 3): ONE LLM pass over every token
    committed since its last call, `pending` (B, T_gap). Returns its next-token logits (B, V)."""
    return forward(llm, pending, cache, last=True, **kw)[1][:, -1]


def pick_rows(logits, temperature, top_p, generators):
    """`sample` for each row of logits (B, V), row b drawing its uniform from generators[b]."""
    u = None if temperature == 0 else torch.cat([uniform(g, logits.device) for g in generators])  # (B,)
    return sample(logits, temperature, top_p, u).tolist()  # one device sync for the whole batch


@torch.no_grad()
def decode(slm, llm, router, prompt_ids, *, vocab_size, max_new_tokens, mode="r2r", threshold=None,
           temperature=0.0, top_p=1.0, generator=None, eos=None, on_step=None):
    """Mixed decoding at batch size 1 with two DynamicCaches and no rollback.

    Each step: 1. the SLM has read every committed token and proposes a candidate;
    2. the router scores it; 3. if routed, the LLM catches up on the gap and writes the
    token instead; 4. the token is committed. mode "slm"/"llm" forces every token to one
    model through the same loop. Cache invariant after each step, with n committed:
    the SLM cache holds prompt + the first n-1 new tokens (the last one is read at the next
    step), the LLM cache holds prompt + new tokens up to its last call, and `pending` is the
    rest. `on_step(slm_cache, llm_cache, pending, trace)` is called after each step (tests check
    the caches with it; generate.py streams the text).
    """
    V = vocab_size  # the shared tokenizer's length: only its ids are ever compared or emitted
    threshold = router.threshold if threshold is None and router is not None else threshold
    eos = eos_ids(slm, llm) if eos is None else eos
    slm_cache, llm_cache, pending, trace = DynamicCache(), DynamicCache(), list(prompt_ids), Trace()
    t0, hidden, logits, token = time.perf_counter(), None, None, None
    for _ in range(max_new_tokens):
        # 1. SLM step and its candidate (the LLM-only mode never runs the SLM).
        if mode != "llm":
            fresh = torch.tensor([trace.tokens[-1:] or prompt_ids], device=slm.device)  # (1, T)
            hidden, logits = slm_step(slm, fresh, slm_cache, V)
            token = pick_rows(logits, temperature, top_p, [generator])[0]
        # 2. Route.
        routed = route(router, slm, hidden, logits, [token], threshold)[0] if mode == "r2r" else mode == "llm"
        # 3. LLM catch-up on the gap; its token replaces the candidate.
        if routed:
            trace.catch_up.append(len(pending) - (len(prompt_ids) if llm_cache.get_seq_length() == 0 else 0))
            llm_logits = catch_up(llm, torch.tensor([pending], device=llm.device), llm_cache)  # (1, V)
            token = pick_rows(llm_logits[:, :V], temperature, top_p, [generator])[0]
            pending = []
        # 4. Commit.
        trace.tokens.append(token)
        trace.from_llm.append(int(routed))
        pending.append(token)
        if on_step is not None:
            on_step(slm_cache, llm_cache, pending, trace)
        if token in eos:
            break
    if slm.device.type == "cuda":  # read the clock only after the GPU has finished
        torch.cuda.synchronize()
    trace.seconds = time.perf_counter() - t0
    return trace


@dataclass
class BatchTrace:
    """A batched decode: a Trace per row, its steps, and the gap (new tokens) of each
    batched LLM call; len(calls) / steps is the share of steps that called the LLM."""
    traces: list
    steps: int = 0
    calls: list = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def decode_batch(slm, llm, router, prompts, *, vocab_size, max_new_tokens, mode="r2r", threshold=None,
                 temperature=0.0, top_p=1.0, generators=None, eos=None, on_step=None):
    """`decode` for B prompts at once: the same steps 1.-4. with a batch dimension.

    Each live row commits one token per step, so all rows have equally many tokens since
    the LLM's last call, and when any row is routed ONE catch-up pass (B, gap) serves the
    batch: routed rows take the LLM's token, the others keep the SLM's. At a routing share
    s a step calls the LLM with probability 1-(1-s)^B. Prompts are left-padded to T columns;
    the mask hides the padding and positions count each row's own tokens (as label.py's
    continue_branches). Cache invariant after step n, in columns of the live rows: the SLM
    cache holds T + n - 1, the LLM cache those up to its last call. Row b samples from
    generators[b] in `decode`'s order, so it equals `decode` with that generator (with one
    shared generator each row's draws would depend on the others). A row's Trace counts
    catch-ups as `decode` does and its seconds run to its last step.
    `on_step(slm_cache, llm_cache, mask, live, traces)` is called after each step (tests).
    """
    V = vocab_size
    threshold = router.threshold if threshold is None and router is not None else threshold
    eos = eos_ids(slm, llm) if eos is None else eos
    T, dev = max(map(len, prompts)), llm.device
    ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=dev)  # (B, T), left-padded
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=dev)  # (B, T)
    slm_cache, llm_cache, batch = DynamicCache(), DynamicCache(), BatchTrace([Trace() for _ in prompts])
    gens, live = generators or [None] * len(prompts), list(range(len(prompts)))  # live: rows still decoding
    last_call = [0] * len(prompts)  # new tokens at each row's last LLM call
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each token's index in its own row, 0 on padding
    t0 = time.perf_counter()
    for n in range(max_new_tokens):
        # 1. SLM step over the columns it has not read: a candidate per live row.
        tokens = [None] * len(live)
        if mode != "llm":
            s = slm_cache.get_seq_length()
            hidden, logits = slm_step(slm, ids[:, s:], slm_cache, V, attention_mask=mask, position_ids=pos[:, s:])
            tokens = pick_rows(logits, temperature, top_p, [gens[b] for b in live])
        # 2. Route each row.
        routed = route(router, slm, hidden, logits, tokens, threshold) if mode == "r2r" else [mode == "llm"] * len(live)
        # 3. One LLM catch-up for the whole batch; only the routed rows take its token.
        if any(routed):
            s = llm_cache.get_seq_length()
            batch.calls.append(ids.shape[1] - max(s, T))
            logits = catch_up(llm, ids[:, s:], llm_cache, attention_mask=mask, position_ids=pos[:, s:])  # (b, V)
            rows = [i for i, r in enumerate(routed) if r]
            for i, token in zip(rows, pick_rows(logits[rows, :V], temperature, top_p, [gens[live[i]] for i in rows])):
                batch.traces[live[i]].catch_up.append(n - last_call[live[i]])
                last_call[live[i]], tokens[i] = n, token
        # 4. Commit. A row that ends leaves the batch and both caches, so the rest stop paying for it.
        ids = torch.cat([ids, torch.tensor(tokens, device=dev)[:, None]], dim=1)  # (b, T + n + 1)
        mask = F.pad(mask, (0, 1), value=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)  # (b, T + n + 1)
        batch.steps, now = n + 1, time.perf_counter() - t0
        for i, b in enumerate(live):
            batch.traces[b].tokens.append(tokens[i])
            batch.traces[b].from_llm.append(int(routed[i]))
            batch.traces[b].seconds = now
        keep = [i for i, t in enumerate(tokens) if t not in eos]
        if len(keep) < len(live):
            idx = torch.tensor(keep, dtype=torch.long)  # on the CPU: it indexes caches on any device (device_map)
            ids, mask, pos, live = ids[idx], mask[idx], pos[idx], [live[i] for i in keep]
            slm_cache.batch_select_indices(idx)
            llm_cache.batch_select_indices(idx)
        if on_step is not None:
            on_step(slm_cache, llm_cache, mask, live, batch.traces)
        if not live:
            break
    batch.seconds = time.perf_counter() - t0
    return batch


# ----------------------------------------------------------------------------- the fast engine

class FastDecoder:
    """`decode` again, for speed: the same four steps over static buffers (README, "Two engines").

    Both models write into a StaticCache sized once: `max_tokens` (prompt + response) plus the
    largest catch-up bucket. Each layer keeps its length as a device tensor, so one function
    serves every position: steps 1-2 (SLM step, candidate, router decision) are ONE function
    of the token fed, and step 3 pads the gap up to a power of two (<= `max_bucket`), one
    function per length. The padding writes junk past the gap, which no query attends to (the
    mask is causal) and the next real tokens overwrite; each layer's length is then set back to
    the real one and the logits read at the gap's last token. On CUDA each function is
    compiled (the one-token ones) and captured as a CUDA graph, once per engine and reused for
    every prompt: per token the host replays a graph and reads back two numbers. Elsewhere the
    same functions run as plain calls (what the tests check). Prompt prefills and gaps longer
    than the largest bucket run uncaptured.
    """

    def __init__(self, slm, llm, *, vocab_size, max_tokens, max_bucket=64, graphs=None):
        if len(set(getattr(llm, "hf_device_map", {"": 0}).values())) > 1:
            raise R2RError("the fast engine needs the LLM on one device (a CUDA graph runs on one GPU): drop "
                           "--device-map or use --engine eager")
        self.slm, self.llm, self.router, self.V, self.max_tokens = slm, llm, None, vocab_size, max_tokens
        self.graphs = llm.device.type == "cuda" if graphs is None else graphs
        self.buckets = [1 << i for i in range(max_bucket.bit_length())]  # catch-up lengths 1, 2, 4, ... <= max_bucket
        self.slm_cache = StaticCache(config=slm.config, max_cache_len=max_tokens + self.buckets[-1])
        self.llm_cache = StaticCache(config=llm.config, max_cache_len=max_tokens + self.buckets[-1])
        for m, cache in ((slm, self.slm_cache), (llm, self.llm_cache)):
            if any(layer.is_sliding for layer in cache.layers):  # their layers also count in Python ints
                raise R2RError(f"{m.config.name_or_path} has sliding-window layers: use --engine eager")
        self.fed = torch.zeros(1, 1, dtype=torch.long, device=slm.device)  # (1, 1) the token the SLM reads next
        self.u_slm = torch.zeros(1, device=slm.device)  # (1,) the uniform of the SLM's next pick
        self.u_llm = torch.zeros(1, device=llm.device)  # (1,) the same for the LLM's
        self.threshold = torch.zeros((), dtype=torch.float32 if slm.device.type == "mps" else torch.float64,
                                     device=slm.device)  # () float64 where it exists: decide exactly as `route`
        self.gap_ids = {P: torch.zeros(1, P, dtype=torch.long, device=llm.device) for P in self.buckets}  # (1, P)
        self.gap = torch.ones(1, dtype=torch.long, device=llm.device)  # (1,) real tokens in the padded gap
        self.llm_seen = 0  # tokens in the LLM cache, on the host
        self.fns, self.setup_seconds = {}, 0.0
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None

    @torch.no_grad()
    def decode(self, router, prompt_ids, *, max_new_tokens, mode="r2r", threshold=None, temperature=0.0, top_p=1.0,
               generator=None, eos=None, on_step=None):
        """`decode(slm, llm, router, prompt_ids, ...)`: the same arguments, tokens and draws from
        `generator`, over the engine's buffers."""
        if len(prompt_ids) + max_new_tokens > self.max_tokens:
            raise R2RError(f"{len(prompt_ids)} prompt + {max_new_tokens} new tokens exceed the fast engine's "
                           f"{self.max_tokens}: build it with a larger max_tokens, or use --engine eager")
        self.router = router
        threshold = router.threshold if threshold is None and router is not None else threshold
        self.threshold.fill_(threshold if mode == "r2r" else 0)
        eos = eos_ids(self.slm, self.llm) if eos is None else eos
        for layer in self.slm_cache.layers + self.llm_cache.layers:  # a new prompt: the old slots are junk now
            layer.cumulative_length.zero_()
        pending, trace, self.llm_seen, t0 = list(prompt_ids), Trace(), 0, time.perf_counter()
        for n in range(max_new_tokens):
            # 1.-2. SLM step, candidate, routing; the prompt's prefill (any length) runs uncaptured.
            routed = mode == "llm"
            if not routed:
                if temperature:
                    self.u_slm.copy_(uniform(generator, self.u_slm.device))
                if n == 0:
                    prompt = torch.tensor([prompt_ids], device=self.slm.device)  # (1, T)
                    hidden, logits = slm_step(self.slm, prompt, self.slm_cache, self.V)
                    out = self._decide(hidden, logits, mode == "r2r", temperature, top_p)
                else:
                    self.fed.fill_(trace.tokens[-1])
                    out = self._slm_fn(mode == "r2r", temperature, top_p)()
                token, routed = out.tolist()
            # 3. LLM catch-up on the gap.
            if routed:
                trace.catch_up.append(len(pending) - (0 if self.llm_seen else len(prompt_ids)))
                if temperature:
                    self.u_llm.copy_(uniform(generator, self.u_llm.device))
                token = self._catch_up(pending, temperature, top_p)
                self.llm_seen, pending = self.llm_seen + len(pending), []
            # 4. Commit.
            trace.tokens.append(token)
            trace.from_llm.append(int(routed))
            pending.append(token)
            if on_step is not None:
                on_step(self.slm_cache, self.llm_cache, pending, trace)
            if token in eos:
                break
        if self.llm.device.type == "cuda":
            torch.cuda.synchronize()
        trace.seconds = time.perf_counter() - t0
        return trace

    def _decide(self, hidden, logits, route, temperature, top_p):
        """Steps 1-2 on the SLM's hidden state (1, H) and logits (1, V): (2,) = candidate, routed."""
        token = sample(logits, temperature, top_p, self.u_slm)  # (1,)
        if not route:
            return torch.cat([token, torch.zeros_like(token)])
        score = torch.sigmoid(self.router(*router_inputs(self.slm, hidden, logits, token, self.router.config["top_k"])))
        return torch.cat([token, (score.to(self.threshold) >= self.threshold).long()])

    def _slm_fn(self, route, temperature, top_p):
        """Steps 1-2 for the token in self.fed, as one captured function: (2,) = candidate, routed."""
        def fn():
            hidden, logits = slm_step(self.slm, self.fed, self.slm_cache, self.V)  # (1, H), (1, V)
            return self._decide(hidden, logits, route, temperature, top_p)
        return self._captured(("slm", route, temperature, top_p, id(self.router) if route else None), fn, True)

    def _catch_up(self, pending, temperature, top_p):
        """Step 3 on the gap `pending`: a captured bucket, or one uncaptured pass for the first
        call (it also reads the prompt) and for gaps longer than the largest bucket."""
        ids = torch.tensor([pending], device=self.llm.device)  # (1, gap)
        if self.llm_seen and len(pending) <= self.buckets[-1]:
            P = 1 << (len(pending) - 1).bit_length()
            fn = self._llm_fn(P, temperature, top_p)  # first: building it sets self.gap
            self.gap_ids[P][:, :len(pending)] = ids
            self.gap.fill_(len(pending))
            return fn().item()
        return sample(catch_up(self.llm, ids, self.llm_cache)[:, :self.V], temperature, top_p, self.u_llm).item()

    def _llm_fn(self, P, temperature, top_p):
        """Step 3 for the self.gap tokens at the start of self.gap_ids[P], padded to P: the LLM's token (1,)."""
        self.gap.fill_(P)  # any gap <= P is valid while capturing; the caller sets the real one after

        def fn():
            start = self.llm_cache.layers[0].cumulative_length.clone()
            out = self.llm.base_model(input_ids=self.gap_ids[P], past_key_values=self.llm_cache, use_cache=True)
            for layer in self.llm_cache.layers:  # forget the padding
                layer.cumulative_length.copy_(start + self.gap[0])
            logits = self.llm.get_output_embeddings()(out.last_hidden_state[:, self.gap - 1])  # (1, 1, V)
            return sample(logits[:, 0, :self.V], temperature, top_p, self.u_llm)
        return self._captured(("llm", P, temperature, top_p), fn, P == 1)

    @torch.no_grad()  # captured and compiled for inference, as decode runs them
    def prepare(self, router, *, mode="r2r", temperature=0.0, top_p=1.0):
        """Capture every function a decode in `mode` can use now, not at its first use (bench.py
        times decodes with no capture inside). Needs allocated caches: call it after a decode."""
        self.router = router
        if mode != "llm":
            self._slm_fn(mode == "r2r", temperature, top_p)
        for P in self.buckets if mode != "slm" else []:
            self._llm_fn(P, temperature, top_p)

    def _captured(self, key, fn, compiled):
        """fn, built once per key; the router is kept alive with it (a graph holds its weights' addresses)."""
        if key not in self.fns:
            self.fns[key] = self.router, self._capture(fn, compiled)
        return self.fns[key][1]

    def _capture(self, fn, compiled):
        """fn as a CUDA graph replayed on each call (compiled first if `compiled`), or fn itself off CUDA.
        The models keep their attention (SDPA): exact under capture, where flex attention was not."""
        if not self.graphs:
            return fn
        t0, fn = time.perf_counter(), torch.compile(fn, dynamic=False) if compiled else fn
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(fn)
        torch.cuda.current_stream().wait_stream(stream)
        graph, gen = torch.cuda.CUDAGraph(), getattr(self.router, "generator", None)
        if gen is not None and gen.device.type == "cuda":  # the random baseline draws inside the graph
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph, pool=self.pool):  # one pool: graphs replay one at a time
            out = fn()
        torch.cuda.synchronize()
        self.setup_seconds += time.perf_counter() - t0

        def replay():
            graph.replay()
            return out
        return replay

    def _warm_up(self, fn, times=3):
        """Run fn `times` times (compiling, autotuning and allocating happen here, not in a graph)
        and undo what each run changed: the caches' lengths (the slots it wrote are junk past the
        length, never read) and the router's random draws."""
        layers = self.slm_cache.layers + self.llm_cache.layers
        gen = getattr(self.router, "generator", None)
        state = gen.get_state() if gen is not None else None
        for _ in range(times):
            lengths = [layer.cumulative_length.clone() for layer in layers]
            fn()
            for layer, n in zip(layers, lengths):
                layer.cumulative_length.copy_(n)
        if gen is not None:
            gen.set_state(state)


def decoder(slm, llm, *, engine, vocab_size, max_tokens, batch_size=1):
    """decode(router, prompt_ids, **options) of the engine asked: "eager" (`decode`) or "fast"
    (a FastDecoder for prompt + response up to `max_tokens`, built once here so that its graphs
    serve every prompt). None picks fast where it pays and fits (`eager_because`), else eager,
    whose batches the scripts decode with `decode_batch`. Prints which engine runs and why."""
    if engine == "fast" and batch_size > 1:
        raise R2RError("--engine fast decodes one prompt at a time: use --batch-size 1, or --engine eager")
    why = "as asked" if engine else eager_because(slm, llm, batch_size)
    if engine == "fast" or why is None:
        try:
            fast = FastDecoder(slm, llm, vocab_size=vocab_size, max_tokens=max_tokens)
        except R2RError as e:
            if engine:
                raise
            why = str(e).split(":")[0]  # a model it refuses: say which
        else:
            how = "CUDA graphs, compiled one-token steps" if fast.graphs else "no graphs off CUDA"
            print(f"engine fast (StaticCache, {how}; {why or 'the default'})")
            return fast.decode
    print(f"engine eager (DynamicCache, one launch per kernel; {why})")
    return functools.partial(decode, slm, llm, vocab_size=vocab_size)


def eager_because(slm, llm, batch_size):
    """Why the default engine is eager here, or None where the fast engine pays and fits: the
    LLM on one GPU, one prompt at a time, and the weights under 1/2.5 of the GPU's memory (the
    fast engine peaked at 2.3x the weights on an H100: README, "Two engines")."""
    if batch_size > 1:
        return "batches decode eager"
    if llm.device.type != "cuda":
        return "the fast engine pays with CUDA graphs"
    if len(set(getattr(llm, "hf_device_map", {"": 0}).values())) > 1:
        return "the LLM spans several GPUs"
    weights = sum(p.numel() * p.element_size() for m in (slm, llm) for p in m.parameters())
    if 2.5 * weights > torch.cuda.get_device_properties(llm.device).total_memory:
        return "the fast engine needs about 2.5x the weights' memory"
    return None


def activated_params(trace, p_slm, p_llm):
    """Average activated parameters per token, the authors' formula (README, "The method")."""
    n, n_llm = len(trace.tokens), sum(trace.from_llm)
    return ((n - n_llm) * p_slm + n_llm * p_llm) / max(n, 1)


def greedy_batch(model, tok, prompts, max_new_tokens, chat=True, *, eos=None, thinking=None):
    """Greedy responses of one model to many prompts: decode_batch in the LLM-only mode, so
    the same rule as every other path, the raw argmax over the tokenizer's ids until an id in
    `eos` (default: the model's EOS ids). Not model.generate, which applies the model's
    generation_config (repetition penalty, ...) even to fields a GenerationConfig of ours
    leaves unset (transformers 5.x). Returns (prompt_ids, response_ids, finished) per prompt;
    a finished response ends with its EOS."""
    rows = [encode_prompt(tok, p, chat, thinking=thinking) for p in prompts]
    eos = eos_ids(model) if eos is None else eos
    batch = decode_batch(None, model, None, rows, vocab_size=len(tok), max_new_tokens=max_new_tokens, mode="llm",
                         eos=eos)
    return [(r, t.tokens, t.tokens[-1] in eos) for r, t in zip(rows, batch.traces)]

# ----------------------------------------------------------------------------- command line

def run_main(main):
    """Run a script's main(); bad input becomes one line on stderr, never a traceback."""
    try:
        main()
    except R2RError as e:
        raise SystemExit(f"error: {e}")


def add_common_args(p, router=True, prompts=None, split="train", engine=False):
    """The flags the scripts share: the pair, its router, the device, and a prompt source."""
    p.add_argument("--slm", default=os.path.join(DEMO, "slm"), help="small model: hub name or local folder")
    p.add_argument("--llm", default=os.path.join(DEMO, "llm"), help="large model sharing the SLM's tokenizer")
    if router:
        p.add_argument("--router", default=os.path.join(DEMO, "router"), help="router folder from train_router.py")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best one present)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on cuda, else fp32)")
    p.add_argument("--device-map", default=None, help="'auto' spreads the LLM (and a judge) over every visible GPU "
                   "with accelerate, for models that do not fit one; the SLM and router stay on --device")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw, without the chat template")
    if engine:
        p.add_argument("--engine", choices=["eager", "fast"], default=None, help="eager: the reference loop, any batch "
                       "size; fast: static caches, CUDA graphs, compiled steps, one prompt at a time, the same tokens in "
                       "fp32 (default: fast with the LLM on one GPU at batch size 1 where memory allows, else eager)")
    if prompts:
        p.add_argument("--prompts", default=os.path.join(DEMO, prompts), help=".txt, .json, .jsonl file or hub dataset")
        p.add_argument("--split", default=split, help="split of a hub dataset")
        p.add_argument("--prompt-field", default="prompt", help="field holding the prompt")
        p.add_argument("--answer-field", default="answer", help="field holding the final answer")

# ----------------------------------------------------------------------------- device, models

def pick_device(device=None, dtype=None):
    """cuda, then mps, then cpu; bf16 on cuda, fp32 elsewhere. Prints the choice and why."""
    why = "as asked" if device and dtype else "the best present" if not device else "default for the device"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise R2RError(f"--dtype {dtype} is not one of bfloat16, float16, float32")
    if device.startswith("cuda"):
        # cuDNN's attention kernel (SDPA's first pick on Hopper) builds a plan for every
        # new sequence length: a decode that grows one token per step pays it each step.
        torch.backends.cuda.enable_cudnn_sdp(False)
    print(f"device {device}, dtype {dtype} ({why})")
    return torch.device(device), getattr(torch, dtype)


def _from_pretrained(loader, path, **kw):
    path = os.path.expanduser(path)
    if not os.path.isdir(path) and not HUB_NAME.fullmatch(path):
        raise R2RError(f"no model folder at {path}: give a local folder or a hub name")
    try:
        return loader.from_pretrained(path, **kw)
    except OSError as e:
        raise R2RError(f"cannot load {path} ({str(e).splitlines()[0]}); with HF_HUB_OFFLINE=1 only local "
                       "folders and models already in the hub cache load")


def load_tokenizer(path):
    return _from_pretrained(AutoTokenizer, path)


def load_model(path, device="cpu", dtype=torch.float32, *, device_map=None):
    """A model in eval mode on `device`, or placed by accelerate with `device_map` ("auto":
    layer by layer over the GPUs). Code reads a model's input device from model.device."""
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=dtype, device_map=device_map)
    return (model if device_map else model.to(device)).eval()


def load_pair(slm_path, llm_path, device="cpu", dtype=torch.float32, *, device_map=None):
    """Load SLM, LLM (with `device_map`, see load_model) and the tokenizer they share.
    Tokenizers must agree id for id; the lm_head may be padded differently within a family
    (README, transformers 5.x notes), so only the tokenizer's ids [0, len(tok)) are ever compared."""
    tok, llm_tok = load_tokenizer(slm_path), load_tokenizer(llm_path)
    if tok.get_vocab() != llm_tok.get_vocab():
        raise R2RError(f"the tokenizers of {slm_path} and {llm_path} differ: R2R needs an SLM and LLM "
                       "that share one tokenizer (same family, e.g. Qwen2.5-0.5B with Qwen2.5-7B)")
    slm, llm = load_model(slm_path, device, dtype), load_model(llm_path, device, dtype, device_map=device_map)
    for m, p in ((slm, slm_path), (llm, llm_path)):
        if m.config.get_text_config().vocab_size < len(tok):
            raise R2RError(f"{p} has fewer output rows than its tokenizer has ids ({len(tok)})")
    return slm, llm, tok


def eos_ids(*models):
    """Every EOS id in the models' generation configs."""
    ids = set()
    for m in models:
        e = m.generation_config.eos_token_id
        ids.update([] if e is None else [e] if isinstance(e, int) else e)
    return ids


def pad_id(tok, model):
    """The tokenizer's pad id, else an EOS id (many chat models define no pad token)."""
    return tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids(model))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- prompts, answers, labels

PROMPT_FORMATS = ("prompts files are .txt (one prompt per line), .json (a list of objects) or .jsonl (one "
                  "object per line) with a prompt field, or a HuggingFace dataset name")


def read_prompts(source, split="train", prompt_field="prompt", answer_field="answer", limit=None):
    """Rows {"prompt", "answer"} from a .txt file (one prompt per line, blank lines skipped),
    a .json/.jsonl file, or a HuggingFace dataset; "answer" is None when the data has none.
    Anything unreadable is one R2RError saying what is wrong and which formats work."""
    try:
        if os.path.isfile(source):
            rows = read_prompts_file(source, prompt_field)
        elif os.path.exists(source) or source.endswith((".txt", ".json", ".jsonl")):
            raise FileNotFoundError("not a file")
        else:
            import datasets
            datasets.disable_progress_bars()
            ds = datasets.load_dataset(source, split=split)
            rows = ds.select(range(min(limit or len(ds), len(ds)))).to_list()
    except (OSError, ValueError, ConnectionError, StopIteration) as e:  # JSON and UTF-8 errors are ValueErrors
        raise R2RError(f"cannot read prompts from {source} ({str(e).splitlines()[0]}); {PROMPT_FORMATS}")
    rows = rows[:limit] if limit else rows
    if not rows:
        raise R2RError(f"{source} holds no prompts; {PROMPT_FORMATS}")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r.get(prompt_field), str)), None)
    if bad is not None:
        raise R2RError(f"{source} has no field '{prompt_field}' holding text on row {bad + 1} (fields: "
                       f"{', '.join(rows[bad])}): name the right one with --prompt-field")
    # A reference gets the same reading as a response: its \boxed{} if it has one, normalised.
    return [{"prompt": r[prompt_field], "answer": reference_answer(r.get(answer_field))} for r in rows]


def reference_answer(a):
    """A dataset's answer as extract_answer reads a response: "\\boxed{\\dfrac{1}{2}}" -> "\\frac{1}{2}"."""
    if a is None:
        return None
    return extract_answer(str(a)) if "\\boxed{" in str(a) else normalize_answer(str(a))


def read_prompts_file(path, prompt_field):
    """A local prompts file as a list of dicts; raises ValueError saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError("not a UTF-8 text file")
    if path.endswith(".txt"):
        return [{prompt_field: line} for line in text.splitlines() if line.strip()]
    rows = json.loads(text) if text.lstrip().startswith("[") else []
    for n, line in enumerate([] if rows else text.splitlines(), 1):  # JSON lines, also accepted under .json
        try:
            rows += [json.loads(line)] if line.strip() else []
        except ValueError as e:
            raise ValueError(f"line {n} is not JSON: {e}")
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("expected JSON objects, one per prompt")
    return rows


def encode_prompt(tok, text, chat=True, *, thinking=None):
    """Token ids of a user prompt, through the tokenizer's chat template when it has one.
    thinking=False sets a template's enable_thinking switch off (Qwen3 thinks first by
    default); templates without the switch ignore it."""
    if not text.strip():
        raise R2RError("empty prompt: give some text with --prompt")
    if chat and tok.chat_template:
        switch = {} if thinking is None else {"enable_thinking": thinking}
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True, **switch)["input_ids"])
    return tok.encode(text)


def extract_answer(text):
    """The final answer of a response, or None. Takes the last \\boxed{...}, its braces
    balanced at any depth ("\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}"), normalised; else a number
    closing the text after "so"/"thus"/"answer" (the demo task), spaces between digits
    dropped: "... so 7 7 9 3" -> "7793"."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, open_at = 0, start + len("\\boxed")
        for i in range(open_at, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return normalize_answer(text[open_at + 1:i])
        return None  # the box never closes: a response cut short
    m = re.search(r"\b(?:so|thus|answer(?: is)?)\s*:?\s*(-?\d(?:[\d ,]*\d)?)\s*\.?\s*$", text)
    return None if m is None else re.sub(r"[ ,]", "", m.group(1))


def normalize_answer(s):
    """One spelling per answer, so equal answers compare equal: "$\\dfrac{1}{2}$." ->
    "\\frac{1}{2}", "\\left( 1, 2 \\right)" -> "(1,2)", "5\\text{ cm}" -> "5", "50\\%" -> "50"."""
    s = re.sub(r"\\[dt]frac", r"\\frac", s.strip().strip("$").rstrip(".").strip("$"))
    s = re.sub(r"\\(?:left|right|displaystyle)(?![a-zA-Z])|\\[,;:! ]|\^\{?\\circ\}?|\\?%", "", s)
    s = re.sub(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}$", "", s)  # a unit after the value
    s = re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s).rstrip(".")


def load_labels(folder):
    """A label.py folder: (its meta.json, every finished shard as one dataset)."""
    import datasets
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise R2RError(f"no labels in {folder}: make them with label.py or pass --labels")
    with open(path) as f:
        meta = json.load(f)
    shards = sorted(s for s in os.listdir(os.path.join(folder, "shards")) if not s.endswith(".tmp"))
    if not shards:
        raise R2RError(f"{folder} holds no finished chunk yet: run label.py to the end")
    paths = [os.path.join(folder, "shards", s) for s in shards]
    # A chunk that kept no row (every response unfinished) is a shard without data files.
    parts = [datasets.load_from_disk(p) for p in paths if any(f.endswith(".arrow") for f in os.listdir(p))]
    return meta, datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({})
