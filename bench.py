"""
bench.py: R2R's speed at batch size 1 in both engines, against LLM only and against the floors that
reading the weights (per step) and the KV cache (per token of context) set.

    python bench.py                                   # the demo pair (or --slm/--llm/--router)
    python bench.py --pair r1-1.5b+32b --share 0.13   # random weights of the paper's sizes (GPU)
    python bench.py --batch-sizes 1 2 4 8 16          # R2R against LLM only as the batch grows
    # real sizes on a CPU (docs/speed.md)
    python bench.py --pair qwen3-0.6b+1.7b --contexts 300 4096 --buffers 1024 16384

Per engine (r2r.EagerEngine; fast.FastEngine) and mode (SLM only, LLM only, R2R): ms per new token,
the first step (the prompt's prefill) timed apart, each figure the median of --repeats runs with min
and max; R2R's speedup over LLM only; the floor (weight bytes over a bandwidth measured in the same
run: a step reads every weight once); capture seconds (once, untimed); peak memory against the
weights; a prediction, SLM step + s x LLM step at LLM share s; how many greedy tokens the engines
share (all, in fp32).

--contexts: per engine, the SLM step, LLM step and a catch-up of 8 at each context, and their slopes
in ms per 1K tokens against the floor of reading the KV cache; the caches are filled with zeros, not
a prompt (a step costs the same whatever they hold; a 4K-token prefill of a 1.7B model takes minutes
on a CPU). --buffers: the fast engine's SLM step at the first context, buffers of each size, over
context buckets and over one.

--pair: random weights from published configs and a random router sending --share of the tokens to
the LLM (the paper: about 13%). --batch-sizes: instead, tokens per second of each mode by batch size
B (r2r.decode_batch), and the steps that called the LLM: 1-(1-s)^B at s.
"""

import gc
import os
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fast
import r2r

# Published configs (the fields that set a model's cost): random weights at real size,
# here and in demo/rehearse.py.
QWEN2 = dict(
    model_type="qwen2", vocab_size=151936, rope_theta=10000.0, max_position_embeddings=131072
)
QWEN3 = dict(
    model_type="qwen3",
    vocab_size=151936,
    head_dim=128,
    rope_theta=1000000.0,
    max_position_embeddings=40960,
)
# Published sizes: hidden size, layers, attention heads, KV heads, MLP width, tied embeddings.
SIZES = {
    "r1-1.5b": (QWEN2, 1536, 28, 12, 2, 8960, False),
    "r1-32b": (dict(QWEN2, vocab_size=152064), 5120, 64, 40, 8, 27648, False),
    "qwen3-0.6b": (QWEN3, 1024, 28, 16, 8, 3072, True),
    "qwen3-1.7b": (QWEN3, 2048, 28, 16, 8, 6144, True),
    "qwen3-8b": (QWEN3, 4096, 36, 32, 8, 12288, False),
    "qwen3-14b": (QWEN3, 5120, 40, 40, 8, 17408, False),
}
CONFIGS = {
    name: dict(
        base,
        hidden_size=H,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=mlp,
        tie_word_embeddings=tied,
    )
    for name, (base, H, layers, heads, kv_heads, mlp, tied) in SIZES.items()
}
PAIRS = {
    "r1-1.5b+32b": ("r1-1.5b", "r1-32b"),
    "qwen3-0.6b+8b": ("qwen3-0.6b", "qwen3-8b"),
    # fits a 24 GB CPU machine in fp32
    "qwen3-0.6b+1.7b": ("qwen3-0.6b", "qwen3-1.7b"),
}
MODES = ("slm", "llm", "r2r")
# Tokens of the catch-up timed at each context: about the mean gap at a 13% LLM share.
GAP = 8


def measure(fn, device, reps, warm=1):
    """Seconds of each of `reps` calls of fn(), after `warm` untimed ones. Each call is waited for:
    the decode loop must read every result before it can take its next decision, so on a GPU the
    host's launch time and the kernels' run time add up rather than overlap."""
    for _ in range(warm):
        fn()
    # Wait until what the warm-up queued has run.
    r2r.elapsed(0.0, device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(r2r.elapsed(t, device))
    return times


def spread(xs, scale=1.0, digits=2):
    """Repeated measurements as their median with min and max, as benchmark tools print them."""
    mid, lo, hi = scale * statistics.median(xs), scale * min(xs), scale * max(xs)
    return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


class Vocab:
    """A tokenizer's length (151,643 ids in these Qwen families) and no EOS:
    what random-weight pairs need of one."""

    eos_token_id = None

    def __len__(self):
        return 151643


def random_pair(name, device, dtype):
    """SLM and LLM of a published pair with random weights, and a stand-in for their tokenizer."""
    models = []
    for key in PAIRS[name]:
        torch.manual_seed(0)
        cfg = dict(CONFIGS[key])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device(device):
            models.append(AutoModelForCausalLM.from_config(config, dtype=dtype).eval())
    return models[0], models[1], Vocab()


def bandwidth(device):
    """Bytes per second of a device copy, read and written (the median of 10):
    what the floors divide by."""
    # fp32: 1 GiB, 128 MiB off CUDA
    x = torch.empty(2**28 if device.type == "cuda" else 2**25, device=device)  # (n,)
    y = torch.empty_like(x)
    seconds = statistics.median(measure(lambda: y.copy_(x), device, 10))
    return 2 * x.numel() * x.element_size() / seconds


def weight_bytes(model):
    """Bytes a decode step reads: every weight, but only one row of an input
    embedding that is not the lm_head."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    unread = 0 if emb is head else emb.numel() * emb.element_size()
    return sum(p.numel() * p.element_size() for p in model.parameters()) - unread


def run_engine(slm, llm, tok, router, prompts, kind, args, **kw):
    """SLM only, LLM only and R2R through one engine, --repeats times: per mode its traces,
    ms per token of each run and seconds of each decode's first step (the prefill);
    capture seconds; peak GiB."""
    max_tokens = max(map(len, prompts)) + args.max_new_tokens
    engine = fast.pick_engine(slm, llm, tok, kind=kind, max_tokens=max_tokens)
    # Both engines route with the same draws.
    if getattr(router, "generator", None) is not None:
        router.generator.manual_seed(0)
    if slm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(slm.device)
    warm_tokens = min(8, args.max_new_tokens)
    for mode in MODES:
        # A warm-up decode; the fast engine then captures every graph before the clock runs.
        r2r.decode(engine, router, prompts[0], max_new_tokens=warm_tokens, mode=mode, **kw)
        if kind == "fast":
            engine.prepare(router, mode=mode, up_to=max_tokens)
    traces = {m: [] for m in MODES}
    ms = {m: [] for m in MODES}
    prefill = {m: [] for m in MODES}
    # The modes interleaved: a busy spell on the machine hits them alike.
    for _ in range(args.repeats):
        for mode in MODES:
            # (trace, prefill, steps) per prompt
            runs = [timed_decode(engine, router, p, mode, args, kw) for p in prompts]
            seconds = sum(sum(s) for *_, s in runs)
            steps = sum(len(s) for *_, s in runs)
            ms[mode].append(1000 * seconds / max(steps, 1))
            traces[mode] += [t for t, _, _ in runs]
            prefill[mode] += [first for _, first, _ in runs]
        r2r.status(f"  {kind}: " + ", ".join(f"{m} {ms[m][-1]:.2f}" for m in MODES) + " ms/token")
    peak = r2r.peak_memory_gib(slm.device)
    return traces, ms, prefill, getattr(engine, "setup_seconds", 0.0), peak


def timed_decode(engine, router, prompt, mode, args, kw):
    """A decode, the seconds of its first step (the prompt's prefill) and of each later step. In R2R
    the LLM reads the prompt at its first call: that step is priced as its later calls (their
    median) where it has any."""
    stamps = []
    trace = r2r.decode(
        engine,
        router,
        prompt,
        max_new_tokens=args.max_new_tokens,
        mode=mode,
        on_step=lambda *_: stamps.append(time.perf_counter()),
        **kw,
    )
    steps = [b - a for a, b in zip(stamps, stamps[1:])]  # steps 1, 2, ...
    routed = [i for i, f in enumerate(trace.from_llm[1:]) if f]
    if mode == "r2r" and routed and not trace.from_llm[0]:
        # With no later call, the first stays whole.
        later = [steps[i] for i in routed[1:]]
        steps[routed[0]] = statistics.median(later or [steps[routed[0]]])
    return trace, trace.seconds - (stamps[-1] - stamps[0]), steps


def agreement(a, b):
    """Share of positions where two engines agree on token and source,
    and the first that differs."""
    pairs = [
        (x, y)
        for ta, tb in zip(a, b)
        for x, y in zip(zip(ta.tokens, ta.from_llm), zip(tb.tokens, tb.from_llm))
    ]
    first = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
    return sum(x == y for x, y in pairs) / max(len(pairs), 1), "none" if first is None else first


def engine_table(slm, llm, tok, router, prompts, args, bw, **kw):
    """Both engines side by side: ms per token against the floor that weight bytes over
    the measured bandwidth give, speedups, setup cost, memory against the weights,
    prefills, a prediction, agreement."""
    floor = {"slm": weight_bytes(slm) / bw * 1e3, "llm": weight_bytes(llm) / bw * 1e3}
    runs = {e: run_engine(slm, llm, tok, router, prompts, e, args, **kw) for e in args.engines}
    joined = r2r.Trace.join(runs[args.engines[-1]][0]["r2r"])
    share, mean_catch_up = joined.llm_share, joined.mean_catch_up
    floor["r2r"] = floor["slm"] + share * floor["llm"]
    weights = sum(p.numel() * p.element_size() for m in (slm, llm) for p in m.parameters())
    context = max(map(len, prompts)) + args.max_new_tokens
    peak_of = "CUDA" if slm.device.type == "cuda" else "process RSS"
    print(
        f"bandwidth {bw / 1e12:.3f} TB/s (a device copy); context {context} tokens; "
        f"R2R LLM share {share:.1%}, mean catch-up {mean_catch_up:.1f} tokens; "
        f"{args.repeats} runs, ms: median (min-max); peak: {peak_of}"
    )
    print(
        "| engine | mode | ms/token | floor ms | measured / floor | R2R speedup, same engine "
        "| over eager LLM only | first step (prefill) ms | capture+compile s | peak GiB / weights |"
    )
    print("|---" * 10 + "|")
    med = {e: {m: statistics.median(x) for m, x in run[1].items()} for e, run in runs.items()}
    for engine, (_, ms, prefill, setup, peak) in runs.items():
        for mode, m in med[engine].items():
            # No eager run: nothing to divide.
            eager = f"{med['eager']['llm'] / m:.2f}x" if "eager" in runs else "-"
            speedups = f"{med[engine]['llm'] / m:.2f}x | {eager}" if mode == "r2r" else " | "
            print(
                f"| {engine} | {mode} | {spread(ms[mode])} | {floor[mode]:.2f} "
                f"| {m / floor[mode]:.2f} | {speedups} | {spread(prefill[mode], 1e3)} "
                f"| {setup:.0f} | {peak:.1f} / {weights / 2**30:.1f} |"
            )
    # What the parts predict: an SLM step per token, plus an LLM call for a share s of them (a
    # catch-up of a few tokens costs about one LLM step: both read every weight once).
    for engine, ms in med.items():
        for s in sorted({round(share, 3), 0.13}):
            pred = ms["slm"] + s * ms["llm"]
            measured = f" (measured {ms['r2r']:.2f})" if s == round(share, 3) else ""
            print(
                f"{engine}: predicted R2R at LLM share {s:.1%}: {pred:.2f} ms/token, "
                f"{ms['llm'] / pred:.2f}x over LLM only" + measured
            )
    if len(runs) == 2:
        for mode in MODES:
            same, first = agreement(*(runs[e][0][mode] for e in args.engines))
            print(
                f"greedy tokens and routing, fast vs eager, {mode}: {same:.1%} identical, "
                f"first difference at token {first}"
            )


def fill(engine, context, llm=True):
    """A started engine's caches (the SLM's; the LLM's too if `llm`) holding `context`
    zeros, as after a prompt."""
    for model, cache in ((engine.slm, engine.slm_cache), (engine.llm, engine.llm_cache))[: 1 + llm]:
        layers, heads, D = fast.kv_shape(model)
        # keys and values (1, KVH, context, D)
        kv = torch.zeros(1, heads, context, D, dtype=model.dtype, device=model.device)
        for i in range(layers):
            cache.update(kv, kv, i)


# As r2r.decode: with autograd on, the caches would keep every step's graph.
@torch.no_grad()
def step_times(engine, context, reps, parts):
    """Seconds per call of each of `parts` (SLM step, LLM step, catch-up of GAP tokens) at `context`
    tokens, `reps` calls each after two untimed ones (the first reads the filled cache uncaptured,
    the second captures on CUDA)."""
    # Engines built before hold their caches in reference cycles: free them before filling these.
    gc.collect()
    engine.start(
        None,
        [0] * context,
        use_router=False,
        threshold=0.0,
        sampling=r2r.Sampling(),
        max_new_tokens=room(reps),
    )
    fill(engine, context, llm=parts != ["slm"])
    calls = {
        "slm": lambda: engine.propose([0]),
        "llm": lambda: engine.catch_up([0]),
        "gap": lambda: engine.catch_up([0] * GAP),
    }
    return {part: measure(calls[part], engine.llm.device, reps, warm=2) for part in parts}


def room(reps):
    """Tokens that step_times adds to a context."""
    return (reps + 2) * (GAP + 2)


def context_table(slm, llm, tok, args, bw):
    """Per engine, the SLM step, LLM step and a catch-up at each context, and their slopes against
    the floor of reading the KV cache (its bytes over the bandwidth); then the fast engine's SLM
    step by buffer size."""
    print(
        f"| engine | context | SLM step ms | LLM step ms | catch-up of {GAP} ms |\n"
        "|---|---|---|---|---|"
    )
    parts = ["slm", "llm", "gap"]
    max_tokens = max(args.contexts) + room(args.repeats)
    for kind in args.engines:
        engine = fast.pick_engine(slm, llm, tok, kind=kind, max_tokens=max_tokens)
        times = {c: step_times(engine, c, args.repeats, parts) for c in args.contexts}
        for c, t in times.items():
            cells = " | ".join(spread(t[p], 1e3) for p in parts)
            print(f"| {kind} | {c} | {cells} |")
        if len(times) > 1:
            slopes = []
            for p in parts:
                # Microseconds per call: their slope per token of context is ms per 1K tokens.
                us = [1e6 * statistics.median(t[p]) for t in times.values()]
                slopes.append(statistics.linear_regression(args.contexts, us).slope)
            cells = " | ".join(f"{k:+.2f}" for k in slopes)
            print(f"| {kind} | slope, ms per 1K tokens | {cells} |")
    kv = {m: fast.cache_bytes(m, 1000) / bw * 1e3 for m in (slm, llm)}
    print(
        "| floor | KV bytes of 1K tokens / bandwidth "
        f"| +{kv[slm]:.2f} | +{kv[llm]:.2f} | +{kv[llm]:.2f} |"
    )
    if not args.buffers:
        return
    c = args.contexts[0]
    print(
        f"| fast engine, buffer | context buckets | SLM step at context {c}, ms "
        "| same, one bucket: the whole buffer |\n|---|---|---|---|"
    )
    ms = {}
    for buffer in args.buffers:
        # One bucket (min_context past the buffer), then the ladder.
        for one in (True, False):
            min_context = 2 * buffer + 128 if one else 256
            engine = fast.FastEngine(slm, llm, tok, max_tokens=buffer, min_context=min_context)
            ms[buffer, one] = step_times(engine, c, args.repeats, ["slm"])["slm"]
        # The last engine's buckets: the ladder.
        ladder = " ".join(map(str, engine.contexts))
        print(
            f"| {buffer} | {ladder} | {spread(ms[buffer, False], 1e3)} "
            f"| {spread(ms[buffer, True], 1e3)} |"
        )
    lo, hi = min(args.buffers), max(args.buffers)
    ratios = [
        f"{statistics.median(ms[hi, one]) / statistics.median(ms[lo, one]):.2f}x {what}"
        for one, what in ((False, "over context buckets"), (True, "over one bucket"))
    ]
    print(f"fast SLM step at context {c}, buffer {hi} over {lo}: " + ", ".join(ratios))


def batch_table(slm, llm, tok, router, prompts, args, **kw):
    """The batch-size curve: tokens per second of every mode over the same prompts,
    B at a time; R2R's LLM calls."""
    print(
        "| B | SLM only tokens/s | LLM only tokens/s | R2R tokens/s | LLM share s "
        "| steps calling the LLM | 1-(1-s)^B | same, b = rows still decoding | R2R / LLM only |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    engine = r2r.EagerEngine(slm, llm, tok)
    for B in args.batch_sizes:
        speed = {m: [] for m in MODES}
        # Each figure the median of --repeats runs, the modes interleaved.
        for mode in MODES * args.repeats:
            # A warm-up before each mode's first run at this B.
            if not speed[mode]:
                r2r.decode_batch(engine, router, prompts[:B], max_new_tokens=8, mode=mode, **kw)
            runs = [
                r2r.decode_batch(
                    engine,
                    router,
                    prompts[i : i + B],
                    max_new_tokens=args.max_new_tokens,
                    mode=mode,
                    **kw,
                )
                for i in range(0, len(prompts), B)
            ]
            traces = [t for run in runs for t in run.traces]
            n = sum(len(t.tokens) for t in traces)
            speed[mode].append(n / sum(run.seconds for run in runs))
        # The LLM share: R2R's, the last mode run.
        s = r2r.Trace.join(traces).llm_share
        steps = sum(run.steps for run in runs)
        # The formula at each step's own batch: rows that reached EOS have left it.
        live = [
            sum(len(t.tokens) > i for t in run.traces) for run in runs for i in range(run.steps)
        ]
        tps = {m: spread(x, digits=0) for m, x in speed.items()}
        print(
            f"| {B} | {tps['slm']} | {tps['llm']} | {tps['r2r']} | {s:.1%} "
            f"| {sum(len(run.gaps) for run in runs) / steps:.1%} | {1 - (1 - s) ** B:.1%} "
            f"| {sum(1 - (1 - s) ** b for b in live) / steps:.1%} | "
            f"{statistics.median(speed['r2r']) / statistics.median(speed['llm']):.2f}x |"
        )
    if slm.device.type == "cuda":
        gib = r2r.peak_memory_gib(slm.device)
        print(f"{torch.cuda.get_device_name(slm.device)}: peak memory {gib:.1f} GiB")


def main(argv=None):
    p = r2r.parser(__doc__, prompts="test.jsonl", split="test")
    p.add_argument(
        "--engines", nargs="+", choices=["eager", "fast"], default=["eager", "fast"], help="engines"
    )
    p.add_argument("--pair", choices=list(PAIRS), help="random weights of a published pair instead")
    p.add_argument("--share", type=float, default=0.13, help="a --pair's random router's LLM share")
    p.add_argument("--n-prompts", type=int, default=20, help="prompts decoded per mode")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens (--pair: exactly)")
    p.add_argument("--prompt-len", type=int, default=128, help="a --pair's prompt tokens")
    p.add_argument("--repeats", type=int, default=3, help="runs of each figure (their median)")
    # Tables instead of (or beside) the engine table.
    p.add_argument(
        "--contexts",
        type=int,
        nargs="*",
        default=[],
        help="also time each step at these context lengths, e.g. 256 1024 4096 (the caches "
        "filled with zeros: no prefill)",
    )
    p.add_argument(
        "--buffers",
        type=int,
        nargs="*",
        default=[],
        help="with --contexts: the fast engine's SLM step at the first context with buffers of "
        "these sizes, e.g. 1024 16384",
    )
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="*",
        help="print the batch-size table instead (tokens per second at each B; --n-prompts is "
        "rounded up to a multiple of the largest B)",
    )
    p.add_argument(
        "--serve-clients",
        type=int,
        nargs="*",
        help="instead, time serve.py's requests/s and tokens/s at these numbers of concurrent "
        "openai clients, e.g. 1 4 16 (the demo pair by default)",
    )
    p.add_argument(
        "--memory-snapshot",
        help="CUDA: record every allocation and write a snapshot to this .pickle at the end, or "
        "when memory runs out (open it at pytorch.org/memory_viz)",
    )
    args = p.parse_args(argv)
    sizes = args.batch_sizes or [1]
    # Before any model loads.
    r2r.check_args(args, n_prompts=1, max_new_tokens=1, prompt_len=1, repeats=1)
    if args.serve_clients:
        return serve_table(args)
    if not 0 <= args.share <= 1 or min(sizes + args.contexts) < 1:
        raise r2r.R2RError(
            "--share must lie in [0, 1]; contexts and batch sizes must be at least 1"
        )
    if args.buffers and min(args.buffers) < (args.contexts or [1 << 60])[0] + room(args.repeats):
        raise r2r.R2RError(
            "--buffers needs --contexts, and buffers that hold the first "
            f"+ {room(args.repeats)} tokens"
        )
    args.n_prompts = -(-args.n_prompts // max(sizes)) * max(sizes)
    rows = None
    if not args.pair:
        rows = r2r.read_prompts(args.prompts, args.split, args.prompt_field, limit=args.n_prompts)
        r2r.read_router_config(args.router)
    device, dtype = r2r.pick_device(args.device, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    if args.pair is None:
        slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype, device_map=args.device_map)
        router = r2r.load_router(args.router, slm, tok, device)
        prompts = [r2r.encode_prompt(tok, r["prompt"], not args.no_chat_template) for r in rows]
        eos = None
    else:
        slm, llm, tok = random_pair(args.pair, device, dtype)
        router = r2r.ConfidenceRouter("random", 100, 1 - args.share, gen)
        g = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(0, len(tok), (args.prompt_len,), generator=g).tolist()
            for _ in range(args.n_prompts)
        ]
        # Random weights: decode exactly --max-new-tokens.
        eos = set()
    # Refuses, before any decoding, a prompt with no room in the models' positions.
    limits = r2r.pair_limits(tok, slm, llm)
    for p in prompts:
        r2r.room(limits, p, args.max_new_tokens)
    batch = "batch sizes " + " ".join(map(str, sizes)) if args.batch_sizes else "batch size 1"
    print(
        f"SLM {r2r.n_params(slm) / 1e6:.1f}M, LLM {r2r.n_params(llm) / 1e6:.1f}M parameters; "
        f"{len(prompts)} prompts, up to {args.max_new_tokens} new tokens, {batch}"
    )
    if args.batch_sizes:
        return batch_table(slm, llm, tok, router, prompts, args, eos=eos)

    if args.memory_snapshot and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        bw = bandwidth(device)
        engine_table(slm, llm, tok, router, prompts, args, bw, eos=eos, generator=gen)
        if args.contexts:
            context_table(slm, llm, tok, args, bw)
    finally:
        # After an error too: out of memory is when the snapshot is most wanted.
        if args.memory_snapshot and device.type == "cuda":
            torch.cuda.memory._dump_snapshot(args.memory_snapshot)
            r2r.status(f"memory snapshot written to {args.memory_snapshot}")


# ----------------------------------------------------------------------------- serve.py under load


def serve_table(args):
    """serve.py under load, in a subprocess on a free loopback port (--max-batch-size: the most
    clients): c openai clients each ask for the next of --n-prompts prompts (rounded up to a
    multiple of the most clients) once their last answer came, greedy, up to --max-new-tokens.
    Requests/s and tokens/s over the wall time, medians of --repeats runs (min-max), and the
    mean batch size the server decoded them in."""
    import concurrent.futures
    import re
    import subprocess
    import sys
    import tempfile

    import openai

    if args.pair or min(args.serve_clients) < 1:
        raise r2r.R2RError("--serve-clients takes numbers of at least 1, and no --pair")
    most = max(args.serve_clients)
    n = -(-args.n_prompts // most) * most
    rows = r2r.read_prompts(args.prompts, args.split, args.prompt_field)
    prompts = [rows[i % len(rows)]["prompt"] for i in range(n)]
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")]
    cmd += ["--port", "0", "--slm", args.slm, "--llm", args.llm, "--router", args.router]
    cmd += ["--max-batch-size", str(most), "--max-tokens", str(args.max_new_tokens)]
    # The pair's own flags, so the server runs as asked.
    for flag in ("device", "dtype", "device_map"):
        cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)] if getattr(args, flag) else []
    cmd += ["--no-chat-template"] if args.no_chat_template else []
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            # serve.py prints its address once it listens.
            while not (found := re.search(r"at (http://\S+/v1)", log.seek(0) or log.read())):
                if server.poll() is not None:
                    # Its last line says why.
                    log.seek(0)
                    why = (log.read().strip().splitlines() or ["no output"])[-1]
                    raise r2r.R2RError(f"serve.py stopped: {why}")
                time.sleep(0.2)
            client = openai.OpenAI(base_url=found.group(1), api_key="-", max_retries=0)

            def ask(prompt):
                messages = [dict(role="user", content=prompt)]
                r = client.chat.completions.create(
                    model="-", messages=messages, max_tokens=args.max_new_tokens, temperature=0
                )
                return r.usage.completion_tokens, r.r2r["batch_size"]

            # A warm-up request.
            ask(prompts[0])
            print(f"serve.py, {n} requests of up to {args.max_new_tokens} new tokens")
            print("| clients | requests/s | tokens/s | mean batch size |\n|---|---|---|---|")
            for c in args.serve_clients:
                requests, tokens, batches = [], [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(c) as pool:
                        answers = list(pool.map(ask, prompts))
                    seconds = time.perf_counter() - t0
                    requests.append(n / seconds)
                    tokens.append(sum(k for k, _ in answers) / seconds)
                    batches += [size for _, size in answers]
                mean = statistics.mean(batches)
                print(f"| {c} | {spread(requests)} | {spread(tokens, digits=0)} | {mean:.1f} |")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    r2r.run_main(main)
