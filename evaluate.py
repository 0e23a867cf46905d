"""
evaluate.py: R2R's trade-off, accuracy against LLM share, on prompts with checkable answers.

    python evaluate.py                                       # demo pair and router, 500 problems
    python evaluate.py --plot pareto.png --out results.json  # also the picture and rows as JSON
    torchrun --nproc-per-node 8 evaluate.py ...              # 8 processes; the first reports

Rows: SLM only, LLM only, R2R at the router's saved threshold and at a sweep of thresholds,
and, at the LLM share each R2R row reached, routing by SLM entropy and at random (the
authors' baselines, README). Each baseline's threshold is set so that it would route
that share of the SLM's own steps. Every accuracy carries a 95% bootstrap interval over
problems; every row says how faithful it is to the LLM: the share of responses identical
to LLM-only decoding, and the share of final answers that differ from LLM-only's.
Prints a Markdown table; --out writes the rows (JSON or CSV), --plot draws them
(matplotlib, optional). Greedy decoding throughout; answers are compared by r2r.same_answer.
"""

import csv
import datetime
import json
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

import fast
import r2r

FIELDS = "method threshold share acc acc_lo acc_hi identical flipped params n".split()


# ----------------------------------------------------------------------------- the table


def bootstrap_ci(correct, n_boot=1000, seed=0):
    """95% percentile bootstrap interval of the accuracy: resample the problems with
    replacement n_boot times (seeded, so a rerun gives the same interval)."""
    c = torch.tensor(correct, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(c), (n_boot, len(c)), generator=gen)  # (n_boot, n)
    lo, hi = c[draws].mean(1).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def score_row(name, threshold, traces, reference, rows, tok, p_slm, p_llm):
    """One row of the table, as a dict with FIELDS. `reference` holds the LLM-only traces:
    `identical` is the share of responses equal to them token for token, `flipped` the share
    of problems whose final answer differs from theirs."""

    texts = [tok.decode(t.tokens, skip_special_tokens=True) for t in traces]
    correct = [r2r.same_answer(text, r["answer"]) for text, r in zip(texts, rows)]
    mine = [r2r.final_answer(text) for text in texts]
    llm = [r2r.final_answer(tok.decode(t.tokens, skip_special_tokens=True)) for t in reference]
    lo, hi = bootstrap_ci(correct)
    identical = sum(t.tokens == r.tokens for t, r in zip(traces, reference))
    run = r2r.Trace.join(traces)
    return dict(
        method=name,
        threshold=threshold,
        share=run.llm_share,
        acc=sum(correct) / len(rows),
        acc_lo=lo,
        acc_hi=hi,
        identical=identical / len(rows),
        flipped=sum(a != b for a, b in zip(mine, llm)) / len(rows),
        params=run.activated_params(p_slm, p_llm),
        n=len(rows),
    )


def decode_all(engine, router, prompts, args, bar, **kw):
    """Decodes of every prompt, --batch-size at a time (r2r.decode_batch; each row equals its own
    batch-1 decode, tests/test_batch.py, except under the random baseline, whose one generator is
    drawn in batch order), or one by one (r2r.decode); `bar` counts the prompts. A batch takes
    prompts of similar length, which on the demo task means responses of similar length, so it
    ends soon after most of its rows. Under torchrun, process r of n decodes every n-th prompt by
    length from the r-th, and every process gets every trace."""
    kw.update(max_new_tokens=args.max_new_tokens)
    ranks, traces = PartialState(), {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[
        ranks.process_index :: ranks.num_processes
    ]
    for i in range(0, len(order), args.batch_size):
        rows = order[i : i + args.batch_size]
        if len(rows) == 1:
            traces[rows[0]] = r2r.decode(engine, router, prompts[rows[0]], **kw)
        else:
            batch = r2r.decode_batch(engine, router, [prompts[b] for b in rows], **kw)
            traces.update(zip(rows, batch.traces))
        bar.update(len(rows))
    # (prompt index, Trace) pairs from every process.
    traces = dict(gather_object(list(traces.items())))
    return [traces[i] for i in range(len(prompts))]


@torch.no_grad()
def slm_step_scores(slm, tok, prompts, traces, k):
    """Confidence scores (r2r.confidence_scores) at every step of the SLM's own greedy
    decodes, from one teacher-forced pass each: what the baselines' thresholds are set on."""
    scores = {"entropy": [], "random": []}
    # The random baseline's threshold, the same every run.
    gen = torch.Generator(device=slm.device).manual_seed(0)
    for p, t in zip(prompts, traces):
        hidden = r2r.forward(slm, torch.tensor([p + t.tokens[:-1]]), last=True)[0]  # (1, T, H)
        logits = slm.get_output_embeddings()(hidden[0, len(p) - 1 :])[
            :, : len(tok)
        ]  # (n, V): response steps only
        topk = logits.float().topk(k, dim=-1).values  # (n, k)
        for name, s in r2r.confidence_scores(topk, gen).items():
            if name in scores:
                scores[name].append(s)
    return {name: torch.cat(s) for name, s in scores.items()}


def quantile(x, q):
    """torch.quantile's value (linear interpolation) at any size: it refuses over 2^24 elements."""
    x, pos = x.double().sort().values, q * (len(x) - 1)
    lo = int(pos)
    return (x[lo] + (pos - lo) * (x[min(lo + 1, len(x) - 1)] - x[lo])).item()


def parse_args(argv=None):
    p = r2r.parser(__doc__, prompts="test.jsonl", split="test", engine=True)
    p.add_argument("--limit", type=int, default=None, help="evaluate only this many prompts")
    p.add_argument(
        "--thresholds", type=float, nargs="*", default=[0.3, 0.8], help="router thresholds to sweep"
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest response")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="prompts decoded together in every row (1: one by one with r2r.decode; the same "
        "table but for random routing, whose draws depend on the batch); 16 fits Qwen3-0.6B + 8B "
        "at 4K tokens on one 80 GB GPU: lower it for larger pairs or if you run out of memory",
    )
    p.add_argument("--out", default=None, help="write every row to this .json or .csv file")
    p.add_argument(
        "--plot",
        default=None,
        help="draw accuracy against LLM share into this image (.png, .pdf, .svg); needs matplotlib",
    )
    args = p.parse_args(argv)
    r2r.check_args(args, limit=1, max_new_tokens=1, batch_size=1)
    if any(not 0 <= t <= 1 for t in args.thresholds):
        raise r2r.R2RError(
            f"--thresholds {' '.join(map(str, args.thresholds))}: each must lie in [0, 1]"
        )
    if args.out and not args.out.endswith((".json", ".csv")):
        raise r2r.R2RError(f"--out {args.out}: name a .json or a .csv file")
    # Fail now, not after the evaluation.
    for flag, path in (("out", args.out), ("plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise r2r.R2RError(f"--{flag} {path}: its folder does not exist")
        if path:
            r2r.check_writable(os.path.dirname(os.path.abspath(path)), flag)
    if args.plot and not args.plot.endswith((".png", ".pdf", ".svg")):
        raise r2r.R2RError(f"--plot {args.plot}: name a .png, .pdf or .svg file")
    if args.plot:
        pyplot()  # fail now, not after the evaluation
    return args


def evaluate(args):
    """Decode every prompt for every row; returns the rows (dicts with FIELDS)."""
    # torchrun's processes (one without it), a GPU each, gathering up to a day apart.
    ranks = PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(days=1))
    rows = r2r.read_prompts(
        args.prompts, args.split, args.prompt_field, args.answer_field, args.limit
    )
    if any(r["answer"] is None for r in rows):
        raise r2r.R2RError(
            f"{args.prompts} lacks '{args.answer_field}' on some rows: evaluation needs answers"
        )
    r2r.read_router_config(args.router)
    device, dtype = r2r.pick_device(args.device, args.dtype)
    slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype, device_map=args.device_map)
    router = r2r.load_router(args.router, slm, tok, device)
    prompts = [r2r.encode_prompt(tok, r["prompt"], not args.no_chat_template) for r in rows]
    p_slm, p_llm = r2r.n_params(slm), r2r.n_params(llm)
    # Refuses, before decoding, a prompt with no room in the models' positions.
    limits = r2r.pair_limits(tok, slm, llm)
    rooms = [r2r.room(limits, p, args.max_new_tokens) for p in prompts]
    engine = fast.pick_engine(
        slm,
        llm,
        tok,
        kind=args.engine,
        batch_size=args.batch_size,
        max_tokens=max(len(p) + r for p, r in zip(prompts, rooms)),
    )
    # The saved threshold first, no repeats.
    thresholds = list(dict.fromkeys([router.threshold] + sorted(args.thresholds)))
    # This process's share of the prompts.
    mine = len(range(ranks.process_index, len(rows), ranks.num_processes))
    bar = tqdm(
        total=mine * (2 + 3 * len(thresholds)),
        desc="greedy",
        unit="prompt",
        disable=not ranks.is_main_process,
    )
    # Every row's traces, to say once whether any response stopped at the models' positions.
    decoded = []

    def row(name, threshold, traces):
        decoded.extend(traces)
        result = score_row(name, threshold, traces, llm_traces, rows, tok, p_slm, p_llm)
        # On stderr: stdout is the table only.
        if ranks.is_main_process:
            th = "-" if threshold is None else f"{threshold:.3f}"
            bar.write(
                f"{name:12s} threshold {th:>6s}  LLM share "
                f"{result['share']:6.1%}  accuracy {result['acc']:6.1%}  identical to LLM "
                f"{result['identical']:6.1%}",
                file=sys.stderr,
            )
        return result

    # Single-model rows through the same loop in a forced mode: one decoding rule for every row.
    slm_traces = decode_all(engine, None, prompts, args, bar, mode="slm")
    llm_traces = decode_all(engine, None, prompts, args, bar, mode="llm")
    results = [row("SLM only", None, slm_traces), row("LLM only", None, llm_traces)]
    scores = slm_step_scores(slm, tok, prompts, slm_traces, router.config["top_k"])
    for t in thresholds:
        name = "R2R (saved)" if t == router.threshold else "R2R"
        bar.set_description(f"R2R {t:.3f}")
        r = row(name, t, decode_all(engine, router, prompts, args, bar, threshold=t))
        results.append(r)
        # Baselines at the share R2R reached: route the same share of the SLM's own steps.
        for kind, s in scores.items():
            bt = quantile(s, 1 - r["share"]) if r["share"] > 0 else 1.0
            base = r2r.ConfidenceRouter(
                kind, router.config["top_k"], bt, torch.Generator(device=device).manual_seed(0)
            )
            bar.set_description(kind)
            results.append(row(f"{kind}", bt, decode_all(engine, base, prompts, args, bar)))
    bar.close()
    r2r.note_cut(limits, decoded, rooms * (len(decoded) // len(rooms)), args.max_new_tokens)
    return results


def write_rows(results, path):
    """Every row to a .json (a list of objects) or .csv file, written atomically."""
    with r2r.atomic(path) as tmp, open(tmp, "w", newline="") as f:
        if path.endswith(".json"):
            json.dump(results, f, indent=1)
        else:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(results)


def pyplot():
    """matplotlib.pyplot, imported only for --plot: matplotlib is an optional dependency."""
    try:
        import matplotlib
    except ImportError:
        raise r2r.R2RError("--plot needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def plot(results, path):
    """The paper's picture: accuracy against the share of tokens the LLM wrote, with 95%
    intervals. R2R's threshold sweep is a curve, entropy and random routing at the same
    shares beside it, SLM only and LLM only as points, the saved threshold starred.
    Returns the legend's labels."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [
        (
            "R2R (router threshold sweep)",
            lambda m: m.startswith("R2R"),
            dict(marker="o", color="C3"),
        ),
        (
            "SLM entropy, same LLM shares",
            lambda m: m == "entropy",
            dict(marker="s", ls="--", color="C0"),
        ),
        ("random, same LLM shares", lambda m: m == "random", dict(marker="x", ls=":", color="C7")),
        ("SLM only", lambda m: m == "SLM only", dict(marker="v", ls="none", color="C2", ms=9)),
        ("LLM only", lambda m: m == "LLM only", dict(marker="^", ls="none", color="C1", ms=9)),
        (
            "R2R, saved threshold",
            lambda m: m == "R2R (saved)",
            dict(marker="*", ls="none", color="k", ms=15),
        ),
    ]
    for label, chosen, style in series:
        rs = sorted((r for r in results if chosen(r["method"])), key=lambda r: r["share"])
        err = [
            [100 * (r["acc"] - r["acc_lo"]) for r in rs],
            [100 * (r["acc_hi"] - r["acc"]) for r in rs],
        ]
        ax.errorbar(
            [100 * r["share"] for r in rs],
            [100 * r["acc"] for r in rs],
            yerr=err,
            capsize=3,
            label=label,
            **style,
        )
    labels = [
        ax.annotate(
            f"{r['threshold']:.2f}",
            (100 * r["share"], 100 * r["acc"]),
            textcoords="offset points",
            xytext=(6, -12),
            fontsize=8,
        )
        for r in sorted(results, key=lambda r: (r["share"], -r["acc"]))
        if r["method"].startswith("R2R")
    ]
    # 0% (SLM only) to 100% (LLM only), with R2R's few percent readable.
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(
        [0, 1, 2, 5, 10, 20, 50, 100], labels=["0", "1", "2", "5", "10", "20", "50", "100"]
    )
    ax.set_xlabel("tokens written by the LLM (%)")
    ax.set_ylabel("accuracy (%), 95% bootstrap interval")
    ax.set_title(f"accuracy against LLM share, {results[0]['n']} problems")
    ax.grid(alpha=0.3)
    # Beside the axes, where it covers no point.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    separate(labels, fig.canvas.get_renderer())
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return ax.get_legend_handles_labels()[1]


def separate(labels, renderer):
    """Moves each threshold label down, a point at a time, until it overlaps none placed before
    it."""
    placed = []
    for label in labels:
        while any(label.get_window_extent(renderer).overlaps(box) for box in placed):
            label.xyann = (label.xyann[0], label.xyann[1] - 1)
        placed.append(label.get_window_extent(renderer))


def main(argv=None):
    args = parse_args(argv)
    results = evaluate(args)
    # Under torchrun, the first process reports.
    if not PartialState().is_main_process:
        return results
    n = results[0]["n"]
    print(f"\n{n} problems from {args.prompts}, greedy, max {args.max_new_tokens} new tokens\n")
    print(
        "| method | threshold | LLM share | accuracy | 95% interval | identical to LLM "
        "| answer differs from LLM | avg activated params |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        th = "" if r["threshold"] is None else f"{r['threshold']:.3f}"
        print(
            f"| {r['method']} | {th} | {r['share']:.1%} | {r['acc']:.1%} "
            f"| {r['acc_lo']:.1%} - {r['acc_hi']:.1%} | "
            f"{r['identical']:.1%} | {r['flipped']:.1%} | {r['params'] / 1e6:.3f}M |"
        )
    if args.out:
        write_rows(results, args.out)
        r2r.status(f"wrote {len(results)} rows to {args.out}")
    if args.plot:
        plot(results, args.plot)
        r2r.status(f"drew {args.plot}")
    return results


if __name__ == "__main__":
    r2r.run_main(main)
