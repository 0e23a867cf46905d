"""
generate.py: R2R mixed decoding (R2R Stage 3). The SLM writes every token except
those the router sends to the LLM, which first catches up on the tokens it has not seen
in one batched forward pass. Both KV caches only ever hold committed tokens: no rollback.

    python generate.py --prompt "4837+2956"                   # the demo pair and its router
    python generate.py --prompt "4837+2956" --mode llm        # every token from the LLM
    python generate.py --slm Qwen/Qwen2.5-0.5B-Instruct --llm Qwen/Qwen2.5-7B-Instruct \\
        --router router/ --prompts-file prompts.jsonl --json

Prints each response with the LLM's tokens highlighted (colour on a terminal, [[...]]
otherwise) and one summary line; with --json, one JSON object per prompt per line.
The decoding loop itself lives in r2r.decode, where bench.py and evaluate.py use it too.
"""
import argparse
import json
import os
import sys

import torch

import r2r


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r2r.add_common_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat the flag for several")
    p.add_argument("--prompts-file", help="JSON/JSONL file with a 'prompt' field per row")
    # decoding
    p.add_argument("--mode", choices=["r2r", "slm", "llm"], default="r2r",
                   help="r2r routes with the router; slm / llm force every token to one model")
    p.add_argument("--threshold", type=float, default=None,
                   help="route to the LLM when the router's score is at least this (default: the router's saved one)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; above 0 samples (SLM and LLM alike)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling: prompt i draws from its own seed + i")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded at once (r2r.decode_batch); "
                   "the tokens are the same at every batch size")
    # output
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    args = p.parse_args(argv)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise r2r.R2RError(f"--threshold {args.threshold} is outside [0, 1]")
    if args.max_new_tokens < 1:
        raise r2r.R2RError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.batch_size < 1:
        raise r2r.R2RError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise r2r.R2RError("--temperature must be >= 0 and --top-p in (0, 1]")
    return args


def render(tok, trace, colour):
    """The new text with the LLM's tokens marked. Decodes whole prefixes at each change of
    writer and slices, so multi-token characters and spaces come out as in one decode."""
    marks = ("\033[1;31m", "\033[0m") if colour else ("[[", "]]")
    text, prev, start = [], "", 0
    for i in range(1, len(trace.tokens) + 1):
        if i == len(trace.tokens) or trace.from_llm[i] != trace.from_llm[start]:
            full = tok.decode(trace.tokens[:i], skip_special_tokens=True)
            piece = full[len(prev):]
            if trace.from_llm[start] and piece.strip():  # leading space stays outside the marks
                lead = piece[:len(piece) - len(piece.lstrip())]
                piece = f"{lead}{marks[0]}{piece.lstrip()}{marks[1]}"
            text.append(piece)
            prev, start = full, i
    return "".join(text)


def summarize(trace, p_slm, p_llm):
    n, calls = len(trace.tokens), len(trace.catch_up)
    return dict(new_tokens=n, llm_share=sum(trace.from_llm) / max(n, 1), llm_calls=calls,
                mean_catch_up=sum(trace.catch_up) / max(calls, 1), tokens_per_s=n / max(trace.seconds, 1e-9),
                activated_params=r2r.activated_params(trace, p_slm, p_llm))


def decode_in_batches(slm, llm, router, ids, vocab_size, args):
    """Each prompt's trace, in order, --batch-size prompts at a time. Prompt i samples from
    its own generator (seed + i), so its tokens do not depend on the batch it is in."""
    gens = [torch.Generator(device=llm.device).manual_seed(args.seed + i) for i in range(len(ids))]
    kw = dict(vocab_size=vocab_size, max_new_tokens=args.max_new_tokens, mode=args.mode, threshold=args.threshold,
              temperature=args.temperature, top_p=args.top_p)
    B = args.batch_size
    for i in range(0, len(ids), B):
        if B == 1:  # the reading path
            yield r2r.decode(slm, llm, router, ids[i], generator=gens[i], **kw)
        else:
            yield from r2r.decode_batch(slm, llm, router, ids[i:i + B], generators=gens[i:i + B], **kw).traces


def main(argv=None):
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [row["prompt"] for row in r2r.read_prompts(args.prompts_file)]
    if not prompts:
        raise r2r.R2RError("no prompt: give --prompt TEXT or --prompts-file FILE")
    device, dtype = r2r.pick_device(args.device, args.dtype)
    slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype)
    router = r2r.load_router(args.router, slm, tok, device) if args.mode == "r2r" else None
    p_slm, p_llm = r2r.n_params(slm), r2r.n_params(llm)
    ids = [r2r.encode_prompt(tok, prompt, chat=not args.no_chat_template) for prompt in prompts]
    for prompt, trace in zip(prompts, decode_in_batches(slm, llm, router, ids, len(tok), args)):
        s = summarize(trace, p_slm, p_llm)
        if args.json:
            text = tok.decode(trace.tokens, skip_special_tokens=True)
            print(json.dumps(dict(prompt=prompt, text=text, token_ids=trace.tokens, from_llm=trace.from_llm, **s)))
            continue
        print(render(tok, trace, colour=sys.stdout.isatty()))
        print(f"-- {s['new_tokens']} new tokens | LLM share {s['llm_share']:.1%} | {s['llm_calls']} LLM calls, "
              f"mean catch-up {s['mean_catch_up']:.1f} tokens | {s['tokens_per_s']:.1f} tokens/s | "
              f"avg activated params {s['activated_params'] / 1e6:.3g}M")


if __name__ == "__main__":
    r2r.run_main(main)
