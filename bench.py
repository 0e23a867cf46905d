"""
bench.py: R2R's speed at batch size 1 in both engines, against LLM only and against the floor
that the weights' bytes set.

    python bench.py                                   # the demo pair (or --slm/--llm/--router)
    python bench.py --pair r1-1.5b+32b --share 0.13   # random weights of the paper's sizes (GPU)
    python bench.py --batch-sizes 1 2 4 8 16          # R2R against LLM only as the batch grows

For each engine (r2r.EagerEngine; fast.FastEngine) and each of SLM only, LLM only
and R2R it decodes the same prompts and reports ms per new token; R2R's speedup over LLM only
in the same engine and over eager LLM only; the floor, weight bytes over a memory bandwidth
measured in the same run (a decode step reads every weight once), and measured / floor; the
fast engine's capture and compile seconds (paid once, not in the timings); peak GPU memory;
a prediction, SLM step + s x LLM step at an LLM share s, for deciding before a run; and how
many greedy tokens the two engines share (exactly all in fp32; bf16 kernels differ).
With --pair NAME the models are randomly initialised from published configs, and a random
router sends --share of the tokens to the LLM (the paper's R1-1.5B + R1-32B: about 13%).
Warm-up runs first; on a GPU every clock is read after a synchronize.
With --batch-sizes it prints instead, for each batch size B, the tokens per second of SLM only,
LLM only and R2R (r2r.decode_batch for all three), and how many steps called the LLM: a
batch calls it when any of its rows is routed, 1-(1-s)^B of the steps at an LLM share s.
"""
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fast
import r2r

# Published configs (the fields that set a model's cost): random weights at real size,
# here and in demo/rehearse.py.
QWEN2 = dict(model_type="qwen2", vocab_size=151936, rope_theta=10000.0, max_position_embeddings=131072)
QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, rope_theta=1000000.0,
             max_position_embeddings=40960)
CONFIGS = {
    "r1-1.5b": dict(QWEN2, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                    intermediate_size=8960, tie_word_embeddings=False),
    "r1-32b": dict(QWEN2, hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                   intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False),
    "qwen3-0.6b": dict(QWEN3, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-8b": dict(QWEN3, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=12288, tie_word_embeddings=False),
    "qwen3-14b": dict(QWEN3, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
                      intermediate_size=17408, tie_word_embeddings=False),
}
PAIRS = {"r1-1.5b+32b": ("r1-1.5b", "r1-32b"), "qwen3-0.6b+8b": ("qwen3-0.6b", "qwen3-8b")}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    """Mean latency of fn() in seconds, after one warm-up call. Each call is waited for:
    the decode loop must read every result before it can take its next decision, so on a
    GPU the host's launch time and the kernels' run time add up rather than overlap."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
        sync(device)
    return (time.perf_counter() - t) / reps


class Vocab:
    """What the engines read of a tokenizer, for random-weight pairs that decode no text: its
    length (151,643 ids for these Qwen families) and no EOS."""
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
    """Bytes per second of a device-to-device copy, counting bytes read and written:
    the memory speed that the floor below divides by, measured in the same run."""
    x = torch.empty(2**28 if device.type == "cuda" else 2**25, device=device)  # (n,) fp32: 1 GiB, 128 MiB off CUDA
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / timed(lambda: y.copy_(x), device, 10)


def weight_bytes(model):
    """Bytes a decode step reads: every weight, but of an input embedding that is not also the
    lm_head only one row."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    unread = 0 if emb is head else emb.numel() * emb.element_size()
    return sum(p.numel() * p.element_size() for p in model.parameters()) - unread


def run_engine(slm, llm, tok, router, prompts, kind, args, **kw):
    """SLM only, LLM only and R2R through one engine: per mode (traces, ms per token), the
    engine's capture/compile seconds and its peak GPU memory."""
    engine = fast.pick_engine(slm, llm, tok, kind=kind, max_tokens=max(map(len, prompts)) + args.max_new_tokens)
    if getattr(router, "generator", None) is not None:
        router.generator.manual_seed(0)  # both engines route with the same draws
    if slm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(slm.device)
    results = {}
    for mode in ("slm", "llm", "r2r"):
        r2r.decode(engine, router, prompts[0], max_new_tokens=min(8, args.max_new_tokens), mode=mode, **kw)  # warm-up
        if kind == "fast":
            engine.prepare(router, mode=mode)  # every graph captured before the clock runs
        traces = [r2r.decode(engine, router, p, max_new_tokens=args.max_new_tokens, mode=mode, **kw) for p in prompts]
        n = sum(len(t.tokens) for t in traces)
        results[mode] = traces, 1000 * sum(t.seconds for t in traces) / n
        r2r.status(f"  {kind} {mode}: {results[mode][1]:.2f} ms/token")
    peak = f"{torch.cuda.max_memory_allocated(slm.device) / 2**30:.1f}" if slm.device.type == "cuda" else "-"
    return results, getattr(engine, "setup_seconds", 0.0), peak


def agreement(a, b):
    """Share of positions where two engines agree on token and source, and the first that differs."""
    pairs = [(x, y) for ta, tb in zip(a, b) for x, y in zip(zip(ta.tokens, ta.from_llm), zip(tb.tokens, tb.from_llm))]
    first = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
    return sum(x == y for x, y in pairs) / max(len(pairs), 1), "none" if first is None else first


def engine_table(slm, llm, tok, router, prompts, args, **kw):
    """Both engines side by side (README, "Two engines"): ms per token against the floor that
    weight bytes over the measured bandwidth give, speedups, setup cost, memory, agreement."""
    bw = bandwidth(slm.device)
    floor = {"slm": weight_bytes(slm) / bw * 1e3, "llm": weight_bytes(llm) / bw * 1e3}
    runs = {e: run_engine(slm, llm, tok, router, prompts, e, args, **kw) for e in args.engines}
    traces = runs[args.engines[-1]][0]["r2r"][0]
    n = sum(len(t.tokens) for t in traces)
    share = sum(sum(t.from_llm) for t in traces) / n
    calls = [g for t in traces for g in t.catch_up[1:]]  # the first call also reads the prompt
    floor["r2r"] = floor["slm"] + share * floor["llm"]
    print(f"bandwidth {bw / 1e12:.2f} TB/s (a device copy); context {max(map(len, prompts)) + args.max_new_tokens} "
          f"tokens; R2R LLM share {share:.1%}, mean catch-up {sum(calls) / max(len(calls), 1):.1f} tokens")
    print("| engine | mode | ms/token | floor ms | measured / floor | R2R speedup, same engine | over eager LLM only "
          "| capture+compile s | peak GiB |\n|---|---|---|---|---|---|---|---|---|")
    eager_llm = runs["eager"][0]["llm"][1] if "eager" in runs else float("nan")
    for engine, (results, setup, peak) in runs.items():
        for mode, (_, ms) in results.items():
            fast = f"{results['llm'][1] / ms:.2f}x | {eager_llm / ms:.2f}x" if mode == "r2r" else " | "
            print(f"| {engine} | {mode} | {ms:.2f} | {floor[mode]:.2f} | {ms / floor[mode]:.2f} | {fast} "
                  f"| {setup:.0f} | {peak} |")
    # What the parts predict: an SLM step per token, plus an LLM call for a share s of them (a
    # catch-up of a few tokens costs about one LLM step: both read every weight once).
    for engine, (results, _, _) in runs.items():
        ms = {m: r[1] for m, r in results.items()}
        for s in sorted({round(share, 3), 0.13}):
            pred = ms["slm"] + s * ms["llm"]
            print(f"{engine}: predicted R2R at LLM share {s:.1%}: {pred:.2f} ms/token, {ms['llm'] / pred:.2f}x over "
                  f"LLM only" + (f" (measured {ms['r2r']:.2f})" if s == round(share, 3) else ""))
    if len(runs) == 2:
        for mode in ("slm", "llm", "r2r"):
            same, first = agreement(*(runs[e][0][mode][0] for e in args.engines))
            print(f"greedy tokens and routing, fast vs eager, {mode}: {same:.1%} identical, first difference at "
                  f"token {first}")


def batch_table(slm, llm, tok, router, prompts, args, **kw):
    """The batch-size curve: for each B, tokens per second of every mode over the same
    prompts, B at a time, and the share of R2R's steps that called the LLM."""
    print("| B | SLM only tokens/s | LLM only tokens/s | R2R tokens/s | LLM share s | steps calling the LLM "
          "| 1-(1-s)^B | same, b = rows still decoding | R2R / LLM only |\n|---|---|---|---|---|---|---|---|---|")
    for B in args.batch_sizes:
        speed = {}
        for mode in ("slm", "llm", "r2r"):
            engine = r2r.EagerEngine(slm, llm, tok)
            r2r.decode_batch(engine, router, prompts[:B], max_new_tokens=8, mode=mode, **kw)  # warm-up
            runs = [r2r.decode_batch(engine, router, prompts[i:i + B], max_new_tokens=args.max_new_tokens,
                                     mode=mode, **kw) for i in range(0, len(prompts), B)]
            traces = [t for run in runs for t in run.traces]
            n = sum(len(t.tokens) for t in traces)
            speed[mode] = n / sum(run.seconds for run in runs)
        s = sum(sum(t.from_llm) for t in traces) / n  # R2R's, the last mode run
        steps = sum(run.steps for run in runs)
        # The formula at each step's own batch: rows that reached EOS have left it.
        live = [sum(len(t.tokens) > i for t in run.traces) for run in runs for i in range(run.steps)]
        print(f"| {B} | {speed['slm']:.0f} | {speed['llm']:.0f} | {speed['r2r']:.0f} | {s:.1%} "
              f"| {sum(len(run.calls) for run in runs) / steps:.1%} | {1 - (1 - s) ** B:.1%} "
              f"| {sum(1 - (1 - s) ** b for b in live) / steps:.1%} | {speed['r2r'] / speed['llm']:.2f}x |")
    if slm.device.type == "cuda":
        gib = torch.cuda.max_memory_allocated(slm.device) / 2**30
        print(f"{torch.cuda.get_device_name(slm.device)}: peak memory {gib:.1f} GiB")


def main(argv=None):
    p = r2r.parser(__doc__, prompts="test.jsonl", split="test")
    p.add_argument("--engines", nargs="+", choices=["eager", "fast"], default=["eager", "fast"],
                   help="engines to run side by side (r2r.EagerEngine and fast.FastEngine)")
    p.add_argument("--pair", default=None, choices=list(PAIRS),
                   help="instead of --slm/--llm/--router: random weights of a published pair")
    p.add_argument("--share", type=float, default=0.13, help="LLM share of the random router (published pairs)")
    p.add_argument("--n-prompts", type=int, default=20, help="prompts decoded per mode")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (published pairs: "
                   "exactly this many, no EOS)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for the published pairs")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=None, help="print the batch-size table instead "
                   "(tokens per second at each B; --n-prompts is rounded up to a multiple of the largest B)")
    p.add_argument("--memory-snapshot", default=None, help="CUDA: record every allocation and write a snapshot to "
                   "this .pickle at the end, or when memory runs out (open it at pytorch.org/memory_viz)")
    args = p.parse_args(argv)
    sizes = args.batch_sizes or [1]
    if not 0 <= args.share <= 1 or min(args.n_prompts, args.max_new_tokens, args.prompt_len, *sizes) < 1:
        raise r2r.R2RError("--share must lie in [0, 1]; counts and batch sizes must be at least 1")
    args.n_prompts = -(-args.n_prompts // max(sizes)) * max(sizes)
    device, dtype = r2r.pick_device(args.device, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    if args.pair is None:
        slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype, device_map=args.device_map)
        router = r2r.load_router(args.router, slm, tok, device)
        rows = r2r.read_prompts(args.prompts, args.split, args.prompt_field, limit=args.n_prompts)
        prompts, eos = [r2r.encode_prompt(tok, r["prompt"], not args.no_chat_template) for r in rows], None
    else:
        slm, llm, tok = random_pair(args.pair, device, dtype)
        router = r2r.ConfidenceRouter("random", 100, 1 - args.share, gen)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, len(tok), (args.prompt_len,), generator=g).tolist() for _ in range(args.n_prompts)]
        eos = set()  # random weights: decode exactly --max-new-tokens
    batch = "batch sizes " + " ".join(map(str, sizes)) if args.batch_sizes else "batch size 1"
    print(f"SLM {r2r.n_params(slm) / 1e6:.1f}M, LLM {r2r.n_params(llm) / 1e6:.1f}M parameters; "
          f"{len(prompts)} prompts, up to {args.max_new_tokens} new tokens, {batch}")
    if args.batch_sizes:
        return batch_table(slm, llm, tok, router, prompts, args, eos=eos)

    if args.memory_snapshot and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        engine_table(slm, llm, tok, router, prompts, args, eos=eos, generator=gen)
    finally:  # an out-of-memory error is when the snapshot is most wanted
        if args.memory_snapshot and device.type == "cuda":
            torch.cuda.memory._dump_snapshot(args.memory_snapshot)
            print(f"memory snapshot written to {args.memory_snapshot}")


if __name__ == "__main__":
    r2r.run_main(main)
