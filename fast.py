"""
fast.py: the fast engine, r2r.decode's seam (start, propose, catch_up) over static buffers,
attention over the live length and CUDA graphs; and the rule that picks an engine. A tutorial reader
can skip it: the tokens are the eager engine's (fp32, tests/test_fast.py and tests/test_context.py).

What it adds to the loop. Both models write into a StaticCache sized once for prompt + response plus
the largest catch-up bucket; each layer keeps its length as a device tensor, so one function serves
every position. SDPA over a static cache reads every slot, live or not: every pass here names a
context bucket (min_context, 2x, 4x, ..., the buffer: the smallest that holds the live length), and
an attention function registered with transformers (ATTENTION) slices keys, values and mask to it
(what it drops is masked anyway). Steps 1-2 (SLM step, candidate, router score against a threshold
held in a device tensor) are ONE function of the token read: per token the host fills one number,
replays one graph and reads back four (token, routed, and whether the logits and the score were
finite: NaN or inf stops decoding in one line, as in the eager engine). Step 3 pads the gap to a
power of two (1, 2, 4, ... max_bucket): the padding writes junk K/V past the gap, which no query
attends to (the mask is causal) and the next real tokens overwrite; each layer's length is set back
to the real one inside the function, and the logits are read at the gap's last real token. One
function per (step, catch-up bucket, context bucket), built at first use and kept for every prompt:
on CUDA the one-token ones compiled and all captured as CUDA graphs, off CUDA plain calls (what the
tests check). Sampling draws one uniform per pick from the prompt's generator in both engines.

What it leaves out. Batches (r2r.decode_batch is eager); an LLM over several GPUs (a CUDA graph runs
on one); sliding-window layers (Mistral, Gemma 2: their static layers count in Python ints it cannot
reset); attention other than SDPA (it sets both models to ATTENTION: SDPA exactly where no bucket is
named). Uncaptured: the prompts' prefills, the first catch-up (it reads the prompt), gaps over
max_bucket, gaps whose padding would pass the models' positions. Flex attention also skips empty
blocks, but gave other tokens than eager under CUDA graphs (docs/gpu.md).
"""

import math
import time
from typing import Callable, NamedTuple

import torch
from transformers import AttentionInterface, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import r2r

# The attention both models run under the fast engine.
ATTENTION = "r2r_sdpa"


def sdpa_over_bucket(module, query, key, value, attention_mask, *, context_bucket=None, **kw):
    """transformers' SDPA; a call that names a context bucket attends over only the first
    `context_bucket` slots of a static cache: keys, values (B, KVH, S, D) and mask (B, 1, T, S)
    become views that wide, no copy. The slots it drops lie past the live length, which the mask
    hides anyway, so only the cost changes."""
    if context_bucket is not None:
        key, value = key[:, :, :context_bucket], value[:, :, :context_bucket]
        attention_mask = None if attention_mask is None else attention_mask[..., :context_bucket]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


AttentionInterface.register(ATTENTION, sdpa_over_bucket)
# Under a name it does not know, a model builds NO mask.
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def attend(model, ids, cache, context):
    """model reads ids (1, T) into its static cache, attending over `context` slots
    -> last hidden states (1, T, H)."""
    out = model.base_model(input_ids=ids, cache=cache, use_cache=True, context_bucket=context)
    return out.last_hidden_state


def kv_shape(model):
    """Layers, KV heads and head size: a static cache holds keys and values
    (1, KVH, slots, D) in every layer."""
    c = model.config.get_text_config()
    return (
        c.num_hidden_layers,
        getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    )


def cache_bytes(model, slots):
    return 2 * math.prod(kv_shape(model)) * slots * model.dtype.itemsize


def activation_bytes(model, tokens, context):
    """About the most one pass of `tokens` tokens over `context` slots holds at once, one layer's
    worth (no_grad frees each layer's): keys and values repeated to every head (GQA under a mask),
    scores, the MLP's halves."""
    c = model.config.get_text_config()
    D = kv_shape(model)[2]
    attention = c.num_attention_heads * context * (2 * D + tokens)
    mlp = tokens * (3 * c.intermediate_size + 4 * c.hidden_size)
    return (attention + mlp) * model.dtype.itemsize


def refusal(slm, llm):
    """Why the fast engine cannot run this pair, or None."""
    if len(set(getattr(llm, "hf_device_map", {"": 0}).values())) > 1:
        return "the LLM spans several GPUs, and a CUDA graph runs on one"
    # Their static layers count in Python ints that the engine cannot reset.
    for m in (slm, llm):
        if any(layer.is_sliding for layer in StaticCache(config=m.config, max_cache_len=1).layers):
            return f"{m.name_or_path} has sliding-window layers"
    return None


def unsuitable(slm, llm, batch_size):
    """Why the default engine is eager here, or None where the fast one pays and fits: the LLM on
    one GPU, one prompt at a time, and weights under 1/2.5 of the GPU's memory (the fast engine
    peaked at 2.3x the weights on an H100, docs/gpu.md)."""
    # refusal builds caches: ask it once
    if why := refusal(slm, llm) or ("batches decode eager" if batch_size > 1 else None):
        return why
    if llm.device.type != "cuda":
        return "the fast engine pays off only with CUDA graphs"
    weights = sum(p.numel() * p.element_size() for m in (slm, llm) for p in m.parameters())
    if 2.5 * weights > torch.cuda.get_device_properties(llm.device).total_memory:
        return "the fast engine needs about 2.5x the weights' memory"
    return None


def pick_engine(slm, llm, tok, *, kind, max_tokens, batch_size=1):
    """The engine asked, "eager" (r2r.EagerEngine) or "fast" (a FastEngine for prompt + response
    up to max_tokens, built once so its graphs serve every prompt); None takes the fast one where it
    pays and fits, else eager. Says which and why."""
    why = "as asked" if kind else unsuitable(slm, llm, batch_size)
    if kind == "fast" or why is None:
        engine = FastEngine(slm, llm, tok, max_tokens=max_tokens)
        graphs = "CUDA graphs" if engine.graphs else "no graphs off CUDA"
        r2r.status(f"engine fast ({graphs}; {why or 'the default'})")
        return engine
    r2r.status(f"engine eager (DynamicCache; {why})")
    return r2r.EagerEngine(slm, llm, tok)


class Captured(NamedTuple):
    """A function built once per engine, and the router whose weights its graph reads
    (kept alive)."""

    router: torch.nn.Module
    fn: Callable


class FastEngine(r2r.EagerEngine):
    """r2r.EagerEngine's seam over static buffers for prompt + response up to `max_tokens`,
    attending over context buckets min_context, 2x, 4x, ... (min_context at least the buffer: one
    bucket, every slot read)."""

    def __init__(self, slm, llm, tok, *, max_tokens, max_bucket=64, min_context=256, graphs=None):
        if why := refusal(slm, llm):
            raise r2r.R2RError(f"{why}: use --engine eager")
        super().__init__(slm, llm, tok)
        self.size = max_tokens
        self.graphs = llm.device.type == "cuda" if graphs is None else graphs
        # Catch-up lengths 1, 2, 4, ... <= max_bucket.
        self.buckets = [1 << i for i in range(max_bucket.bit_length())]
        # The largest padded catch-up may start at max_tokens.
        slots = max_tokens + self.buckets[-1]
        # Context buckets min_context, 2x, 4x, ... below the buffer, then the buffer.
        doublings = ((slots - 1) // min_context).bit_length()
        self.contexts = [min_context << i for i in range(doublings)] + [slots]
        # SDPA still; the engine's calls name a context bucket.
        for m in (slm, llm):
            m.set_attn_implementation(ATTENTION)
        self.slm_cache = StaticCache(config=slm.config, max_cache_len=slots)
        self.llm_cache = StaticCache(config=llm.config, max_cache_len=slots)
        # The token the SLM reads next.
        self.fresh = torch.zeros(1, 1, dtype=torch.long, device=slm.device)  # (1, 1)
        # The uniforms of the SLM's and the LLM's next picks.
        self.u_slm = torch.zeros(1, device=slm.device)  # (1,)
        self.u_llm = torch.zeros(1, device=llm.device)  # (1,)
        # The threshold; float64 where it exists, as r2r.route.
        dtype = torch.float32 if slm.device.type == "mps" else torch.float64
        self.threshold = torch.zeros((), dtype=dtype, device=slm.device)  # ()
        # Per catch-up bucket P, the padded gap's ids (1, P).
        self.gap_ids = {
            P: torch.zeros(1, P, dtype=torch.long, device=llm.device) for P in self.buckets
        }
        # Real tokens in the padded gap.
        self.gap = torch.ones(1, dtype=torch.long, device=llm.device)  # (1,)
        # Captured functions by key, and the seconds spent capturing them.
        self.fns = {}
        self.setup_seconds = 0.0
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        r2r.status(self.plan())

    def plan(self):
        """What the engine allocates, in one line: its caches, and about the largest
        captured function's activations."""
        slots = self.contexts[-1]
        P = self.buckets[-1]

        def mib(n):
            return f"{n / 2**20:.0f} MiB"

        return (
            f"fast engine: static caches of {slots} tokens, "
            f"SLM {mib(cache_bytes(self.slm, slots))}, LLM {mib(cache_bytes(self.llm, slots))}; "
            f"context buckets {' '.join(map(str, self.contexts))}; "
            f"a catch-up of {P} over all {slots} slots holds about "
            f"{mib(activation_bytes(self.llm, P, slots))} of activations"
        )

    def bucket(self, n):
        """The smallest context bucket that holds n tokens."""
        return next(c for c in self.contexts if c >= n)

    def start(self, router, prompt_ids, *, use_router, threshold, sampling, max_new_tokens):
        if len(prompt_ids) + max_new_tokens > self.size:
            raise r2r.R2RError(
                f"{len(prompt_ids)} prompt + {max_new_tokens} new tokens exceed the fast engine's "
                f"{self.size}: build it with a larger max_tokens, or use --engine eager"
            )
        self.router = router
        self.use_router = use_router
        self.temperature, self.top_p, self.generator = sampling
        self.prompt_len = len(prompt_ids)
        self.threshold.fill_(threshold if use_router else 0)
        # A new prompt: the old slots are junk now.
        for layer in self.slm_cache.layers + self.llm_cache.layers:
            layer.cumulative_length.zero_()
        # Tokens in each cache, on the host.
        self.slm_seen = self.llm_seen = 0

    def draw(self, u):
        if self.temperature:
            u.copy_(r2r.uniforms([self.generator], u.device))

    def propose(self, fresh):
        """Steps 1-2: the prompt's prefill runs uncaptured (any length), each later token in
        one function."""
        self.draw(self.u_slm)
        if self.slm_seen == 0:
            # The prefill reads after what the cache holds: nothing, or a context bench.py filled.
            self.slm_seen = int(self.slm_cache.get_seq_length())
            ids = torch.tensor([fresh], device=self.slm.device)  # (1, T)
            context = self.bucket(self.slm_seen + len(fresh))
            hidden = attend(self.slm, ids, self.slm_cache, context)[:, -1]  # (1, H)
            logits = self.slm.get_output_embeddings()(hidden)[:, : self.vocab_size]  # (1, V)
            out = self._decide(hidden, logits, self.use_router, self.temperature, self.top_p)
        else:
            self.fresh.fill_(fresh[0])
            context = self.bucket(self.slm_seen + 1)
            fn = self._slm_fn(context, self.use_router, self.temperature, self.top_p)
            out = fn()
        self.slm_seen += len(fresh)
        token, routed, slm_ok, router_ok = out.tolist()
        # The new token's index, as the eager engine counts it.
        n = self.slm_seen - self.prompt_len + 1
        r2r.check_finite(bool(slm_ok), "SLM", n)
        r2r.check_finite(bool(router_ok), "router", n)
        return r2r.Proposal(token, bool(routed))

    def catch_up(self, gap):
        """Step 3: a captured bucket, or one uncaptured pass for the first call (it also reads the
        prompt), for gaps longer than the largest bucket, and where the padding would pass the
        models' last position (it would switch longrope's factors: r2r.rope_limit)."""
        self.draw(self.u_llm)
        ids = torch.tensor([gap], device=self.llm.device)  # (1, gap)
        P = 1 << (len(gap) - 1).bit_length()
        fits = self.llm_seen + P <= self.limits.positions
        if self.llm_seen and P <= self.buckets[-1] and fits:
            # Build (or find) the function first: building it sets self.gap.
            fn = self._llm_fn(P, self.bucket(self.llm_seen + P), self.temperature, self.top_p)
            self.gap_ids[P][:, : len(gap)] = ids
            self.gap.fill_(len(gap))
            out = fn()
        else:
            # As in propose: the first pass reads after what the cache holds.
            self.llm_seen = self.llm_seen or int(self.llm_cache.get_seq_length())
            context = self.bucket(self.llm_seen + len(gap))
            hidden = attend(self.llm, ids, self.llm_cache, context)[:, -1]  # (1, H)
            logits = self.llm.get_output_embeddings()(hidden)[:, : self.vocab_size]  # (1, V)
            out = self._pick(logits, self.temperature, self.top_p)
        self.llm_seen += len(gap)
        token, ok = out.tolist()
        r2r.check_finite(bool(ok), "LLM", self.llm_seen - self.prompt_len + 1)
        return token

    def _decide(self, hidden, logits, use_router, temperature, top_p):
        """Steps 1-2 on the SLM's hidden state (1, H) and logits (1, V) -> (4,): candidate,
        routed, and whether the logits and the router's score are finite (read with the token:
        no extra sync)."""
        token = r2r.sample(logits, temperature, top_p, self.u_slm)  # (1,)
        slm_ok = torch.isfinite(logits).all(-1).long()  # (1,)
        if not use_router:
            return torch.cat([token, torch.zeros_like(token), slm_ok, torch.ones_like(token)])
        feats = r2r.router_inputs(self.slm, hidden, logits, token, self.router.config["top_k"])
        score = torch.sigmoid(self.router(*feats))  # (1,)
        routed = score.to(self.threshold) >= self.threshold  # (1,)
        return torch.cat([token, routed.long(), slm_ok, torch.isfinite(score).long()])

    def _pick(self, logits, temperature, top_p):
        """Step 3's pick from the LLM's logits (1, V) -> (2,): its token, and whether the logits
        are finite."""
        token = r2r.sample(logits, temperature, top_p, self.u_llm)  # (1,)
        return torch.cat([token, torch.isfinite(logits).all(-1).long()])

    def _slm_fn(self, context, use_router, temperature, top_p):
        """Steps 1-2 for the token in self.fresh, as one captured function -> (4,), as _decide."""

        def fn():
            hidden = attend(self.slm, self.fresh, self.slm_cache, context)[:, -1]  # (1, H)
            logits = self.slm.get_output_embeddings()(hidden)[:, : self.vocab_size]  # (1, V)
            return self._decide(hidden, logits, use_router, temperature, top_p)

        router_id = id(self.router) if use_router else None
        key = ("slm", context, use_router, temperature, top_p, router_id)
        return self._captured(key, fn, True)

    def _llm_fn(self, P, context, temperature, top_p):
        """Step 3 for the self.gap tokens at the start of self.gap_ids[P], padded to P
        -> (2,): the LLM's token, and whether its logits were finite."""
        # Any gap <= P is valid while capturing; the caller sets the real one after.
        self.gap.fill_(P)

        def fn():
            start = self.llm_cache.layers[0].cumulative_length.clone()
            hidden = attend(self.llm, self.gap_ids[P], self.llm_cache, context)  # (1, P, H)
            # Forget the padding.
            for layer in self.llm_cache.layers:
                layer.cumulative_length.copy_(start + self.gap[0])
            logits = self.llm.get_output_embeddings()(hidden[:, self.gap - 1])  # (1, 1, V)
            return self._pick(logits[:, 0, : self.vocab_size], temperature, top_p)

        return self._captured(("llm", P, context, temperature, top_p), fn, P == 1)

    # Captured and compiled for inference, as decode runs them.
    @torch.no_grad()
    def prepare(self, router, *, mode="r2r", temperature=0.0, top_p=1.0, up_to=None):
        """Capture now every function a decode in `mode` up to `up_to` tokens can use (bench.py
        times decodes with no capture inside). Needs allocated caches: call it after a decode."""
        self.router = router
        up_to = min(up_to or self.size, self.size)
        if mode != "llm":
            for c in self.contexts[: self.contexts.index(self.bucket(up_to)) + 1]:
                self._slm_fn(c, mode == "r2r", temperature, top_p)
        if mode != "slm":
            for P in self.buckets:
                for c in self.contexts[: self.contexts.index(self.bucket(up_to + P)) + 1]:
                    self._llm_fn(P, c, temperature, top_p)

    def _captured(self, key, fn, compiled):
        """fn, built once per key, under no_grad: a function that recorded autograd
        would keep what it saved."""
        if key not in self.fns:
            self.fns[key] = Captured(self.router, self._capture(torch.no_grad()(fn), compiled))
        return self.fns[key].fn

    def _capture(self, fn, compiled):
        """fn as a CUDA graph replayed on each call (compiled first if `compiled`),
        or fn itself off CUDA."""
        if not self.graphs:
            return fn
        # Every key's function is a closure of the same code: dynamo counts each against one
        # recompile limit.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, len(self.fns) + 8)
        t0 = time.perf_counter()
        fn = torch.compile(fn, dynamic=False) if compiled else fn
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(fn)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        gen = getattr(self.router, "generator", None)
        # The random baseline draws inside the graph.
        if gen is not None and gen.device.type == "cuda":
            graph.register_generator_state(gen)
        # One pool: graphs replay one at a time.
        with torch.cuda.graph(graph, pool=self.pool):
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
