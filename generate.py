"""
generate.py: R2R mixed decoding (R2R Stage 3). The SLM writes every token except those the
router sends to the LLM, which first catches up on the tokens it has not read (the gap) in one
forward pass. Both KV caches only ever hold committed tokens: nothing is rolled back.

    python generate.py --prompt "4837+2956"                   # the demo pair and its router
    python generate.py --prompt "4837+2956" --mode llm        # every token from the LLM
    python generate.py --slm Qwen/Qwen2.5-0.5B-Instruct --llm Qwen/Qwen2.5-7B-Instruct \\
        --router router/ --prompts-file prompts.jsonl --json

On a terminal each response appears as it is decoded (at --batch-size 1; larger batches print
whole responses), the LLM's tokens in colour; written to a file or a pipe, each response is one
line with the LLM's tokens marked [[...]]. Then one summary line per prompt; with --json, one
JSON object per prompt per line instead. The decoding loop itself is r2r.decode
(r2r.decode_batch for several prompts at once), over the engine that fast.pick_engine chooses;
bench.py and evaluate.py use them too.
"""

import json
import os
import re
import sys

import torch

import fast
import r2r

# The LLM's tokens on a terminal: bold red.
COLOUR = ("\033[1;31m", "\033[0m")


def parse_args(argv=None):
    p = r2r.parser(__doc__, engine=True)
    p.add_argument(
        "--prompt", action="append", default=[], help="a prompt; repeat the flag for several"
    )
    p.add_argument(
        "--prompts-file",
        help=".txt (one prompt per line), .json/.jsonl (a 'prompt' field per object) "
        "or a hub dataset",
    )
    p.add_argument(
        "--prompt-field", default="prompt", help="--prompts-file's field holding the prompt"
    )
    p.add_argument(
        "--split", default="train", help="split of a hub dataset given as --prompts-file"
    )
    # decoding
    p.add_argument(
        "--mode",
        choices=["r2r", "slm", "llm"],
        default="r2r",
        help="r2r routes with the router; slm / llm force every token to one model",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="route to the LLM when the router's score is at least this (default: the "
        "router's saved one)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=256, help="stop after this many new tokens"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 is greedy; above 0 samples (SLM and LLM alike)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for sampling: prompt i draws from its own seed + i",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="prompts decoded at once (r2r.decode_batch); in fp32 the tokens are the same at "
        "every batch size (tests/test_batch.py); streams only at 1",
    )
    # output
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    args = p.parse_args(argv)
    r2r.check_args(args, max_new_tokens=1, batch_size=1, temperature=0)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise r2r.R2RError(f"--threshold {args.threshold} is outside [0, 1]")
    if not 0 < args.top_p <= 1:
        raise r2r.R2RError(f"--top-p {args.top_p} is outside (0, 1]")
    if not args.prompt and not args.prompts_file:
        raise r2r.R2RError("no prompt: give --prompt TEXT or --prompts-file FILE")
    if any(not text.strip() for text in args.prompt):
        raise r2r.R2RError("empty prompt: give some text with --prompt")
    return args


# The one task the shipped demo pair was trained on (demo/build.py): a+b, 2 to 4 digit operands.
DEMO_TASK = re.compile(r"[1-9]\d{1,3}\+[1-9]\d{1,3}")


def demo_note(args, prompt):
    """A line for a prompt the demo pair cannot know, or None. Only for the shipped pair."""
    if os.path.realpath(args.slm) != os.path.realpath(os.path.join(r2r.DEMO, "slm")):
        return None
    if DEMO_TASK.fullmatch(re.sub(r"\s", "", prompt)):
        return None
    return (
        "note: the demo pair only knows a+b with 2 to 4 digit operands (like 4837+2956), so "
        f"expect nonsense for {prompt!r}; pass --slm/--llm/--router for your own pair"
    )


class Prefixes:
    """The text of a growing response's prefixes, tok.decode(tokens[:end]) without its special
    tokens, decoded from the last point where it ended on a whole character (a few tokens before
    it, for their context), not from the start: a response of n tokens costs O(n), not O(n^2)
    (vLLM's incremental detokenization)."""

    def __init__(self, tok, context=4):
        self.tok = tok
        self.context = context
        # Where the text last ended on a whole character, and that text.
        self.at = 0
        self.text = ""

    def __call__(self, tokens, end):
        a = max(0, self.at - self.context)
        known = self.tok.decode(tokens[a : self.at], skip_special_tokens=True)
        full = self.tok.decode(tokens[a:end], skip_special_tokens=True) if end >= self.at else ""
        # Not a continuation: decode it all.
        if end < self.at or not full.startswith(known):
            return self.tok.decode(tokens[:end], skip_special_tokens=True)
        text = self.text + full[len(known) :]
        # A whole character: the next call starts here.
        if not text.endswith("\ufffd"):
            self.at, self.text = end, text
        return text


def render(tok, trace, colour):
    """The new text with the LLM's tokens marked. Decodes whole prefixes at each change of writer
    and slices, so spaces come out as in one decode; a character whose bytes two writers share
    goes whole to the run that completes it, as Stream writes it."""
    marks = COLOUR if colour else ("[[", "]]")
    prefix = Prefixes(tok)
    n = len(trace.tokens)
    text = []
    # The text so far, and the first token of the current run of one writer.
    prev, start = "", 0
    for i in range(1, n + 1):
        if i == n or trace.from_llm[i] != trace.from_llm[start]:
            full = prefix(trace.tokens, i)
            # A split character's first bytes wait for the rest.
            full = full if i == n else full.rstrip("\ufffd")
            piece = full[len(prev) :]
            # Leading spaces stay outside the marks.
            if trace.from_llm[start] and piece.strip():
                lead = piece[: len(piece) - len(piece.lstrip())]
                piece = f"{lead}{marks[0]}{piece.lstrip()}{marks[1]}"
            text.append(piece)
            prev, start = full, i
    return "".join(text)


class Stream:
    """Writes a response to `out` as r2r.decode commits it (its on_step hook), with the LLM's
    tokens in colour, byte for byte what render(..., colour=True) gives for the whole trace:
    a run of LLM tokens opens its colour at its first non-space character and closes at the
    run's end. Text is written once it decodes to whole characters (no trailing U+FFFD)."""

    def __init__(self, tok, out=None):
        self.prefix = Prefixes(tok)
        self.out = out or sys.stdout
        # The plain text written so far.
        self.printed = ""
        # The first token of the current run of one writer.
        self.start = 0
        # Leading spaces of an LLM run, written when its first character arrives.
        self.held = ""
        # Whether the current LLM run's colour is on.
        self.opened = False

    def __call__(self, slm_cache, llm_cache, traces):
        trace = traces[0]
        n = len(trace.tokens)
        # A new run begins at the newest token.
        if trace.from_llm[n - 1] != trace.from_llm[self.start]:
            self.flush(trace, n - 1)
            self.start = n - 1
        text = self.prefix(trace.tokens, n)
        if not text.endswith("\ufffd") and text.startswith(self.printed):
            self.write(text[len(self.printed) :], trace.from_llm[self.start])

    def flush(self, trace, end):
        """Write the current run up to token `end` and close it; a character split there goes to
        the next run."""
        text = self.prefix(trace.tokens, end)
        text = text if end == len(trace.tokens) else text.rstrip("\ufffd")
        self.write(text[len(self.printed) :], trace.from_llm[self.start])
        self.out.write(COLOUR[1] if self.opened else self.held)
        self.held, self.opened = "", False
        self.out.flush()

    def write(self, piece, from_llm):
        self.printed += piece
        if from_llm and not self.opened:
            self.held += piece
            if not self.held.strip():
                return
            body = self.held.lstrip()
            piece = f"{self.held[: len(self.held) - len(body)]}{COLOUR[0]}{body}"
            self.held, self.opened = "", True
        self.out.write(piece)
        self.out.flush()


def summarize(trace, p_slm, p_llm):
    """A response's numbers, read off its Trace."""
    return dict(
        new_tokens=len(trace.tokens),
        llm_share=trace.llm_share,
        llm_calls=len(trace.gaps),
        mean_catch_up=trace.mean_catch_up,
        tokens_per_s=len(trace.tokens) / max(trace.seconds, 1e-9),
        activated_params=trace.activated_params(p_slm, p_llm),
    )


def decode_chunk(engine, router, ids, gens, args, stream=None):
    """The traces of a few prompts decoded together (r2r.decode_batch), or of one prompt by
    r2r.decode, which can stream. Prompt i samples from its own generator gens[i], so its
    tokens do not depend on the batch it is in."""
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        mode=args.mode,
        threshold=args.threshold,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    if len(ids) == 1:
        return [r2r.decode(engine, router, ids[0], generator=gens[0], on_step=stream, **kw)]
    return r2r.decode_batch(engine, router, ids, generators=gens, **kw).traces


def show(prompt, trace, tok, s, args, stream):
    """One response: a JSON line, or its text (already streamed, or rendered now) and a summary."""
    if args.json:
        text = tok.decode(trace.tokens, skip_special_tokens=True)
        row = dict(prompt=prompt, text=text, token_ids=trace.tokens, from_llm=trace.from_llm, **s)
        print(json.dumps(row))
        return
    if stream is not None:
        stream.flush(trace, len(trace.tokens))
        print()
    else:
        print(render(tok, trace, colour=sys.stdout.isatty()))
    print(
        f"-- {s['new_tokens']} new tokens | LLM share {s['llm_share']:.1%} | "
        f"{s['llm_calls']} LLM calls, mean catch-up {s['mean_catch_up']:.1f} tokens | "
        f"{s['tokens_per_s']:.1f} tokens/s | "
        f"avg activated params {s['activated_params'] / 1e6:.3g}M"
    )


def note_sampling(temperature, *models):
    """A note, once, where sampling differs from the models' own: r2r applies lm_head itself,
    without a config's final_logit_softcapping (Gemma 2). Greedy is alike: tanh keeps the order."""
    for m in models:
        if temperature > 0 and getattr(m.config.get_text_config(), "final_logit_softcapping", 0):
            r2r.status(
                f"note: {m.name_or_path} soft-caps its logits and r2r does not, so sampling draws "
                "from other probabilities than the model's (greedy decoding is unaffected)"
            )
            return


def main(argv=None):
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [
            row["prompt"]
            for row in r2r.read_prompts(args.prompts_file, args.split, args.prompt_field)
        ]
    if args.mode == "r2r":
        r2r.read_router_config(args.router)
    device, dtype = r2r.pick_device(args.device, args.dtype)
    slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype, device_map=args.device_map)
    router = r2r.load_router(args.router, slm, tok, device) if args.mode == "r2r" else None
    note_sampling(args.temperature, slm, llm)
    p_slm, p_llm = r2r.n_params(slm), r2r.n_params(llm)
    ids = [r2r.encode_prompt(tok, prompt, chat=not args.no_chat_template) for prompt in prompts]
    # Refuses, before decoding, a prompt with no room in the models' positions.
    limits = r2r.pair_limits(tok, slm, llm)
    rooms = [r2r.room(limits, p, args.max_new_tokens) for p in ids]
    gens = [torch.Generator(device=device).manual_seed(args.seed + i) for i in range(len(ids))]
    engine = fast.pick_engine(
        slm,
        llm,
        tok,
        kind=args.engine,
        max_tokens=max(len(p) + r for p, r in zip(ids, rooms)),
        batch_size=args.batch_size,
    )
    # Stream to a terminal, one prompt at a time.
    live = sys.stdout.isatty() and not args.json and args.batch_size == 1
    done = []
    for first in range(0, len(prompts), args.batch_size):
        chunk = range(first, min(first + args.batch_size, len(prompts)))
        for i in chunk:
            note = demo_note(args, prompts[i])
            if note:
                r2r.status(note)
        stream = Stream(tok) if live else None
        traces = decode_chunk(
            engine, router, [ids[i] for i in chunk], [gens[i] for i in chunk], args, stream
        )
        for i, trace in zip(chunk, traces):
            show(prompts[i], trace, tok, summarize(trace, p_slm, p_llm), args, stream)
        done += traces
    r2r.note_cut(limits, done, rooms, args.max_new_tokens)


if __name__ == "__main__":
    r2r.run_main(main)
