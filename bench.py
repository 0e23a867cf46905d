"""
bench.py: R2R's speed at batch size 1, against LLM only and against the ideal that its
own parts allow.

    python bench.py                                   # the demo pair (or --slm/--llm/--router)
    python bench.py --pair r1-1.5b+32b --share 0.13   # random weights of the paper's sizes (GPU)
    python bench.py --batch-sizes 1 2 4 8 16          # R2R against LLM only as the batch grows

For each of SLM only, LLM only and R2R it decodes the same prompts and reports ms per new
token. The ideal R2R time is built from parts measured on their own: an SLM step and a
router call for every token, plus one LLM catch-up pass for each LLM call at the gap length
it really had. measured / ideal near 1 means the loop adds little beyond the models.
With --pair NAME the models are randomly initialised from published configs, and a random
router sends --share of the tokens to the LLM (the paper's R1-1.5B + R1-32B: about 13%).
Warm-up runs first; on a GPU every clock is read after a synchronize.
With --batch-sizes it prints instead, for each batch size B, the tokens per second of SLM only,
LLM only and R2R (r2r.decode_batch for all three), and how many steps called the LLM: a
batch calls it when any of its rows is routed, 1-(1-s)^B of the steps at an LLM share s.
"""
import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

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


def random_pair(name, device, dtype):
    """SLM and LLM of a published pair with random weights, and the shared tokenizer's
    length (151,643 ids for these Qwen families; no text is decoded)."""
    models = []
    for key in PAIRS[name]:
        torch.manual_seed(0)
        cfg = dict(CONFIGS[key])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device(device):
            models.append(AutoModelForCausalLM.from_config(config, dtype=dtype).eval())
    return models[0], models[1], 151643


@torch.no_grad()
def ideal_seconds(slm, llm, router, traces, prompt_len, device, reps):
    """The parts, each timed alone as the loop runs it, down to reading its token: SLM step,
    router call, an LLM pass over g tokens after a cache of prompt length for every gap
    length g that R2R's LLM calls had, and the LLM's prompt prefill, which each prompt's
    first LLM call also does."""
    gaps = [max(g, 1) for t in traces for g in t.catch_up]
    ids = torch.zeros(1, max([prompt_len] + gaps), dtype=torch.long, device=device)

    def step(model, g):
        cache = DynamicCache()
        r2r.forward(model, ids[:, :prompt_len], cache)

        def one_pass():
            r2r.pick(r2r.forward(model, ids[:, :g], cache, last=True)[1][0, -1])
            cache.crop(-g)  # transformers 5.x: a negative count drops that many tokens
            assert cache.get_seq_length() == prompt_len
        return one_pass

    slm_s = timed(step(slm, 1), device, reps)
    H, k = router.config.get("hidden_size", slm.config.hidden_size), router.config["top_k"]
    feats = (torch.randn(1, H, device=device), torch.randn(1, k, device=device), torch.randn(1, H, device=device))
    router_s = timed(lambda: torch.sigmoid(router(*feats)).item(), device, reps)
    llm_s = {g: timed(step(llm, g), device, reps) for g in set(gaps)}
    prefill_s = timed(lambda: r2r.pick(r2r.forward(llm, ids[:, :prompt_len], DynamicCache(), last=True)[1][0, -1]),
                      device, reps)
    n, first_calls = sum(len(t.tokens) for t in traces), sum(bool(t.catch_up) for t in traces)
    return n * (slm_s + router_s) + sum(llm_s[g] for g in gaps) + first_calls * prefill_s, slm_s, router_s


def batch_table(slm, llm, router, prompts, args, **kw):
    """The batch-size curve: for each B, tokens per second of every mode over the same
    prompts, B at a time, and the share of R2R's steps that called the LLM."""
    print("| B | SLM only tokens/s | LLM only tokens/s | R2R tokens/s | LLM share s | steps calling the LLM "
          "| 1-(1-s)^B | same, b = rows still decoding | R2R / LLM only |\n|---|---|---|---|---|---|---|---|---|")
    for B in args.batch_sizes:
        speed = {}
        for mode in ("slm", "llm", "r2r"):
            r2r.decode_batch(slm, llm, router, prompts[:B], max_new_tokens=8, mode=mode, **kw)  # warm-up
            runs = [r2r.decode_batch(slm, llm, router, prompts[i:i + B], max_new_tokens=args.max_new_tokens,
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r2r.add_common_args(p, prompts="test.jsonl", split="test")
    p.add_argument("--pair", default=None, choices=list(PAIRS),
                   help="instead of --slm/--llm/--router: random weights of a published pair")
    p.add_argument("--share", type=float, default=0.13, help="LLM share of the random router (published pairs)")
    p.add_argument("--n-prompts", type=int, default=20, help="prompts decoded per mode")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (published pairs: "
                   "exactly this many, no EOS)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for the published pairs")
    p.add_argument("--reps", type=int, default=20, help="repetitions when timing each part")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=None, help="print the batch-size table instead "
                   "(tokens per second at each B; --n-prompts is rounded up to a multiple of the largest B)")
    args = p.parse_args(argv)
    sizes = args.batch_sizes or [1]
    if not 0 <= args.share <= 1 or min(args.n_prompts, args.max_new_tokens, args.prompt_len, args.reps, *sizes) < 1:
        raise r2r.R2RError("--share must lie in [0, 1]; counts and batch sizes must be at least 1")
    args.n_prompts = -(-args.n_prompts // max(sizes)) * max(sizes)
    device, dtype = r2r.pick_device(args.device, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    if args.pair is None:
        slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype, device_map=args.device_map)
        vocab = len(tok)
        router = r2r.load_router(args.router, slm, tok, device)
        rows = r2r.read_prompts(args.prompts, args.split, args.prompt_field, limit=args.n_prompts)
        prompts, eos = [r2r.encode_prompt(tok, r["prompt"], not args.no_chat_template) for r in rows], None
    else:
        slm, llm, vocab = random_pair(args.pair, device, dtype)
        router = r2r.ConfidenceRouter("random", 100, 1 - args.share, gen)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.n_prompts)]
        eos = set()  # random weights: decode exactly --max-new-tokens
    batch = "batch sizes " + " ".join(map(str, sizes)) if args.batch_sizes else "batch size 1"
    print(f"SLM {r2r.n_params(slm) / 1e6:.1f}M, LLM {r2r.n_params(llm) / 1e6:.1f}M parameters; "
          f"{len(prompts)} prompts, up to {args.max_new_tokens} new tokens, {batch}")
    if args.batch_sizes:
        return batch_table(slm, llm, router, prompts, args, vocab_size=vocab, eos=eos)

    def run(mode):
        kw = dict(vocab_size=vocab, mode=mode, eos=eos, generator=gen)
        r2r.decode(slm, llm, router, prompts[0], max_new_tokens=8, **kw)  # warm-up
        traces = [r2r.decode(slm, llm, router, pr, max_new_tokens=args.max_new_tokens, **kw)
                  for pr in prompts]
        n, s = sum(len(t.tokens) for t in traces), sum(t.seconds for t in traces)
        return traces, 1000 * s / n, n

    results = {mode: run(mode) for mode in ("slm", "llm", "r2r")}
    traces, r2r_ms, n = results["r2r"]
    ideal, slm_s, router_s = ideal_seconds(slm, llm, router, traces, len(prompts[0]), device, args.reps)
    calls = [g for t in traces for g in t.catch_up]
    share = sum(sum(t.from_llm) for t in traces) / n
    print(f"SLM only  {results['slm'][1]:8.2f} ms/token")
    print(f"LLM only  {results['llm'][1]:8.2f} ms/token   (LLM / SLM = {results['llm'][1] / results['slm'][1]:.1f}x)")
    print(f"R2R       {r2r_ms:8.2f} ms/token   LLM share {share:.1%}, {len(calls)} LLM calls, mean catch-up "
          f"{sum(calls) / max(len(calls), 1):.1f} tokens")
    print(f"ideal R2R {1000 * ideal / n:8.2f} ms/token   (SLM step {1000 * slm_s:.2f} ms + router "
          f"{1000 * router_s:.2f} ms per token, plus the LLM calls)")
    print(f"measured / ideal = {r2r_ms / (1000 * ideal / n):.2f}; speedup over LLM only = "
          f"{results['llm'][1] / r2r_ms:.2f}x")
    if device.type == "cuda":
        gib = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"{torch.cuda.get_device_name(device)}: peak memory {gib:.1f} GiB")


if __name__ == "__main__":
    r2r.run_main(main)
