"""
fast.py: the fast engine, r2r.decode's seam (start, propose, catch_up) over static buffers and CUDA
graphs, and the rule that picks an engine. A tutorial reader can skip it: the tokens are the eager
engine's (fp32, tests/test_fast.py).

What it adds to the loop. Both models write into a StaticCache sized once for prompt + response
plus the largest catch-up bucket; each cache layer keeps its length as a device tensor, so one
function serves every position. Steps 1-2 (SLM step, candidate, router score against a threshold
held in a device tensor) are ONE function of the token fed: per token the host fills one number,
replays one graph and reads back two (token, routed). Step 3 pads the gap to a power of two
(1, 2, 4, ... max_bucket), one function per length: the padding writes junk K/V past the gap, which
no query attends to (the mask is causal) and the next real tokens overwrite; each layer's length is
set back to the real one inside the function, and the logits are read at the gap's last real token.
On CUDA the one-token functions are compiled and every function is captured as a CUDA graph once
per engine, at first use, and replayed for every prompt; off CUDA they run as plain calls (what the
tests check). Sampling draws one uniform per pick from the prompt's generator in both engines
(r2r.sample), so a seed gives the same tokens in both.

What it leaves out. Batches (r2r.decode_batch is eager); an LLM spread over several GPUs (a CUDA
graph runs on one); sliding-window layers (Mistral, Gemma 2: their static layers count in Python
ints it cannot reset); uncaptured are the prompt prefills, the first catch-up (it reads the prompt)
and gaps over max_bucket. SDPA over a static cache reads every slot, live or not, so a step costs
the buffer, not the context (docs/gpu.md); transformers' flex attention skips empty blocks but
gave other tokens than eager under CUDA graphs, so the models keep SDPA.
"""
import time
from typing import Callable, NamedTuple

import torch
from transformers import StaticCache

import r2r


def refusal(slm, llm):
    """Why the fast engine cannot run this pair, or None."""
    if len(set(getattr(llm, "hf_device_map", {"": 0}).values())) > 1:
        return "the LLM spans several GPUs, and a CUDA graph runs on one"
    for m in (slm, llm):  # their static layers count in Python ints that the engine cannot reset
        if any(layer.is_sliding for layer in StaticCache(config=m.config, max_cache_len=1).layers):
            return f"{m.name_or_path} has sliding-window layers"
    return None


def unsuitable(slm, llm, batch_size):
    """Why the default engine is eager here, or None where the fast one pays and fits: the LLM on
    one GPU, one prompt at a time, and weights under 1/2.5 of the GPU's memory (the fast engine
    peaked at 2.3x the weights on an H100, docs/gpu.md)."""
    if refusal(slm, llm) or batch_size > 1:
        return refusal(slm, llm) or "batches decode eager"
    if llm.device.type != "cuda":
        return "the fast engine pays with CUDA graphs"
    weights = sum(p.numel() * p.element_size() for m in (slm, llm) for p in m.parameters())
    if 2.5 * weights > torch.cuda.get_device_properties(llm.device).total_memory:
        return "the fast engine needs about 2.5x the weights' memory"
    return None


def pick_engine(slm, llm, tok, *, kind, max_tokens, batch_size=1):
    """The engine asked, "eager" (r2r.EagerEngine) or "fast" (a FastEngine for prompt + response up to
    max_tokens, built once so its graphs serve every prompt); None takes the fast one where it pays
    and fits, else eager. Says which and why."""
    why = "as asked" if kind else unsuitable(slm, llm, batch_size)
    if kind == "fast" or why is None:
        engine = FastEngine(slm, llm, tok, max_tokens=max_tokens)
        r2r.status(f"engine fast ({'CUDA graphs' if engine.graphs else 'no graphs off CUDA'}; {why or 'the default'})")
        return engine
    r2r.status(f"engine eager (DynamicCache; {why})")
    return r2r.EagerEngine(slm, llm, tok)


class Captured(NamedTuple):
    """A function built once per engine, and the router whose weights its graph reads (kept alive)."""
    router: torch.nn.Module
    fn: Callable


class FastEngine(r2r.EagerEngine):
    """r2r.EagerEngine's seam over static buffers for prompt + response up to `max_tokens`."""

    def __init__(self, slm, llm, tok, *, max_tokens, max_bucket=64, graphs=None):
        why = refusal(slm, llm)
        if why:
            raise r2r.R2RError(f"{why}: use --engine eager")
        super().__init__(slm, llm, tok)
        self.size = max_tokens
        self.graphs = llm.device.type == "cuda" if graphs is None else graphs
        self.buckets = [1 << i for i in range(max_bucket.bit_length())]  # catch-up lengths 1, 2, 4, ... <= max_bucket
        self.slm_cache = StaticCache(config=slm.config, max_cache_len=max_tokens + self.buckets[-1])
        self.llm_cache = StaticCache(config=llm.config, max_cache_len=max_tokens + self.buckets[-1])
        self.fed = torch.zeros(1, 1, dtype=torch.long, device=slm.device)  # (1, 1) the token the SLM reads next
        self.u_slm = torch.zeros(1, device=slm.device)  # (1,) the uniform of the SLM's next pick
        self.u_llm = torch.zeros(1, device=llm.device)  # (1,) the same for the LLM's
        self.cut = torch.zeros((), dtype=torch.float32 if slm.device.type == "mps" else torch.float64,
                               device=slm.device)  # () the threshold; float64 where it exists, as r2r.route
        self.gap_ids = {P: torch.zeros(1, P, dtype=torch.long, device=llm.device) for P in self.buckets}  # (1, P)
        self.gap = torch.ones(1, dtype=torch.long, device=llm.device)  # (1,) real tokens in the padded gap
        self.fns = {}
        self.setup_seconds = 0.0
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def start(self, router, prompt_ids, *, route, threshold, temperature, top_p, generator, max_new_tokens):
        if len(prompt_ids) + max_new_tokens > self.size:
            raise r2r.R2RError(f"{len(prompt_ids)} prompt + {max_new_tokens} new tokens exceed the fast engine's "
                               f"{self.size}: build it with a larger max_tokens, or use --engine eager")
        self.router, self.route, self.temperature, self.top_p = router, route, temperature, top_p
        self.generator = generator
        self.cut.fill_(threshold if route else 0)
        for layer in self.slm_cache.layers + self.llm_cache.layers:  # a new prompt: the old slots are junk now
            layer.cumulative_length.zero_()
        self.slm_seen = self.llm_seen = 0  # tokens in each cache, on the host

    def draw(self, u):
        if self.temperature:
            u.copy_(r2r.uniforms([self.generator], u.device))

    def propose(self, fed):
        """Steps 1-2: the prompt's prefill runs uncaptured (any length), each later token in one function."""
        self.draw(self.u_slm)
        if self.slm_seen == 0:
            hidden, logits = r2r.slm_step(self.slm, torch.tensor([fed]), self.slm_cache, self.vocab_size)
            out = self._decide(hidden, logits, self.route, self.temperature, self.top_p)
        else:
            self.fed.fill_(fed[0])
            out = self._slm_fn(self.route, self.temperature, self.top_p)()
        self.slm_seen += len(fed)
        token, routed = out.tolist()
        return r2r.Proposal(token, bool(routed))

    def catch_up(self, gap):
        """Step 3: a captured bucket, or one uncaptured pass for the first call (it also reads the
        prompt) and for gaps longer than the largest bucket."""
        self.draw(self.u_llm)
        ids = torch.tensor([gap], device=self.llm.device)  # (1, gap)
        if self.llm_seen and len(gap) <= self.buckets[-1]:
            P = 1 << (len(gap) - 1).bit_length()
            fn = self._llm_fn(P, self.temperature, self.top_p)  # first: building it sets self.gap
            self.gap_ids[P][:, :len(gap)] = ids
            self.gap.fill_(len(gap))
            token = fn().item()
        else:
            logits = r2r.catch_up(self.llm, ids, self.llm_cache)[:, :self.vocab_size]  # (1, V)
            token = r2r.sample(logits, self.temperature, self.top_p, self.u_llm).item()
        self.llm_seen += len(gap)
        return token

    def _decide(self, hidden, logits, route, temperature, top_p):
        """Steps 1-2 on the SLM's hidden state (1, H) and logits (1, V) -> (2,): candidate, routed."""
        token = r2r.sample(logits, temperature, top_p, self.u_slm)  # (1,)
        if not route:
            return torch.cat([token, torch.zeros_like(token)])
        feats = r2r.router_inputs(self.slm, hidden, logits, token, self.router.config["top_k"])
        return torch.cat([token, (torch.sigmoid(self.router(*feats)).to(self.cut) >= self.cut).long()])

    def _slm_fn(self, route, temperature, top_p):
        """Steps 1-2 for the token in self.fed, as one captured function -> (2,): candidate, routed."""
        def fn():
            hidden, logits = r2r.slm_step(self.slm, self.fed, self.slm_cache, self.vocab_size)  # (1, H), (1, V)
            return self._decide(hidden, logits, route, temperature, top_p)
        return self._captured(("slm", route, temperature, top_p, id(self.router) if route else None), fn, True)

    def _llm_fn(self, P, temperature, top_p):
        """Step 3 for the self.gap tokens at the start of self.gap_ids[P], padded to P -> the LLM's token (1,)."""
        self.gap.fill_(P)  # any gap <= P is valid while capturing; the caller sets the real one after

        def fn():
            start = self.llm_cache.layers[0].cumulative_length.clone()
            out = self.llm.base_model(input_ids=self.gap_ids[P], cache=self.llm_cache, use_cache=True)
            for layer in self.llm_cache.layers:  # forget the padding
                layer.cumulative_length.copy_(start + self.gap[0])
            logits = self.llm.get_output_embeddings()(out.last_hidden_state[:, self.gap - 1])  # (1, 1, V)
            return r2r.sample(logits[:, 0, :self.vocab_size], temperature, top_p, self.u_llm)
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
        """fn, built once per key."""
        if key not in self.fns:
            self.fns[key] = Captured(self.router, self._capture(fn, compiled))
        return self.fns[key].fn

    def _capture(self, fn, compiled):
        """fn as a CUDA graph replayed on each call (compiled first if `compiled`), or fn itself off CUDA."""
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
