"""
evaluate.py: R2R's trade-off, accuracy against LLM share, on prompts with checkable answers.

    python evaluate.py                       # demo pair, demo/router, the 500 demo test problems

Rows: SLM only, LLM only, R2R at the router's saved threshold and at a sweep of thresholds,
and, at the LLM share each R2R row reached, routing by SLM entropy and at random (the
authors' baselines, README). Each baseline's threshold is set so that it would route
that share of the SLM's own steps. Prints a Markdown table. Greedy decoding throughout.
"""
import argparse
import os

import torch
from tqdm import tqdm

import r2r


def accuracy_row(name, threshold, traces, rows, tok, p_slm, p_llm):
    correct = sum(r2r.extract_answer(tok.decode(t.tokens, skip_special_tokens=True)) == r["answer"]
                  for t, r in zip(traces, rows))
    n, n_llm = sum(len(t.tokens) for t in traces), sum(sum(t.from_llm) for t in traces)
    params = sum(r2r.activated_params(t, p_slm, p_llm) * len(t.tokens) for t in traces) / max(n, 1)
    return dict(method=name, threshold=threshold, share=n_llm / max(n, 1), acc=correct / len(rows), params=params)


def greedy_all(model, is_llm, tok, rows, args, batch_size=100):
    """Single-model rows, batched: `--mode slm/llm` equal model.generate token for token
    (tests/test_generate.py), so the batched path gives the same texts, far faster."""
    traces = []
    for i in tqdm(range(0, len(rows), batch_size), desc="greedy", leave=False):
        for _, response, _ in r2r.greedy_batch(model, tok, [r["prompt"] for r in rows[i:i + batch_size]],
                                               args.max_new_tokens, not args.no_chat_template):
            traces.append(r2r.Trace(tokens=response, from_llm=[int(is_llm)] * len(response)))
    return traces


def decode_all(slm, llm, router, tok, prompts, args, desc, **kw):
    """Mixed decodes of every prompt, --batch-size at a time; each row equals its own batch-1
    decode (tests/test_batch.py). A batch takes prompts of similar length, which on the demo
    task means responses of similar length, so it ends soon after most of its rows."""
    kw.update(vocab_size=len(tok), max_new_tokens=args.max_new_tokens)
    if args.batch_size == 1:  # the reading path, r2r.decode
        return [r2r.decode(slm, llm, router, p, **kw) for p in tqdm(prompts, desc=desc, leave=False)]
    order, traces = sorted(range(len(prompts)), key=lambda i: len(prompts[i])), {}
    for i in tqdm(range(0, len(order), args.batch_size), desc=desc, leave=False):
        rows = order[i:i + args.batch_size]
        traces.update(zip(rows, r2r.decode_batch(slm, llm, router, [prompts[b] for b in rows], **kw).traces))
    return [traces[i] for i in range(len(prompts))]


@torch.no_grad()
def slm_step_scores(slm, tok, prompts, traces, k):
    """Confidence scores (r2r.confidence_scores) at every step of the SLM's own greedy
    decodes, from one teacher-forced pass each: what the baselines' thresholds are set on."""
    scores = {"entropy": [], "random": []}
    for p, t in zip(prompts, traces):
        _, logits = r2r.forward(slm, torch.tensor([p + t.tokens[:-1]], device=slm.device))
        topk = logits[0, len(p) - 1:, :len(tok)].float().topk(k, dim=-1).values  # (n, k)
        for name, s in r2r.confidence_scores(topk).items():
            if name in scores:
                scores[name].append(s)
    return {name: torch.cat(s) for name, s in scores.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r2r.add_common_args(p, prompts="test.jsonl", split="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate only this many prompts")
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.3, 0.8], help="router thresholds to sweep")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest response")
    p.add_argument("--batch-size", type=int, default=64, help="prompts decoded at once in the R2R and baseline "
                   "rows (1: one by one with r2r.decode; the table is the same)")
    args = p.parse_args(argv)
    if any(not 0 <= t <= 1 for t in args.thresholds) or min(args.max_new_tokens, args.batch_size) < 1:
        raise r2r.R2RError("--thresholds must lie in [0, 1], --max-new-tokens and --batch-size be at least 1")

    rows = r2r.read_prompts(args.prompts, args.split, args.prompt_field, args.answer_field, args.limit)
    if any(r["answer"] is None for r in rows):
        raise r2r.R2RError(f"{args.prompts} lacks '{args.answer_field}' on some rows: evaluation needs answers")
    device, dtype = r2r.pick_device(args.device, args.dtype)
    slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype)
    router = r2r.load_router(args.router, slm, tok, device)
    prompts = [r2r.encode_prompt(tok, r["prompt"], not args.no_chat_template) for r in rows]
    p_slm, p_llm = r2r.n_params(slm), r2r.n_params(llm)

    def row(name, threshold, traces):
        result = accuracy_row(name, threshold, traces, rows, tok, p_slm, p_llm)
        tqdm.write(f"{name:12s} threshold {'-' if threshold is None else f'{threshold:.3f}':>6s}  "
                   f"LLM share {result['share']:6.1%}  accuracy {result['acc']:6.1%}")
        return result

    slm_traces = greedy_all(slm, False, tok, rows, args)
    results = [row("SLM only", None, slm_traces), row("LLM only", None, greedy_all(llm, True, tok, rows, args))]
    scores = slm_step_scores(slm, tok, prompts, slm_traces, router.config["top_k"])
    for t in dict.fromkeys([router.threshold] + sorted(args.thresholds)):  # saved one first, no repeats
        name = "R2R (saved)" if t == router.threshold else "R2R"
        r = row(name, t, decode_all(slm, llm, router, tok, prompts, args, name, threshold=t))
        results.append(r)
        # Baselines at the share R2R reached: route the same share of the SLM's own steps.
        for kind, s in scores.items():
            bt = s.quantile(1 - r["share"]).item() if r["share"] > 0 else 1.0
            base = r2r.ConfidenceRouter(kind, router.config["top_k"], bt, torch.Generator(device=device).manual_seed(0))
            results.append(row(f"{kind}", bt, decode_all(slm, llm, base, tok, prompts, args, kind)))

    print(f"\n{len(rows)} problems from {args.prompts}, greedy, max {args.max_new_tokens} new tokens\n")
    print("| method | threshold | LLM share | accuracy | avg activated params |")
    print("|---|---|---|---|---|")
    for r in results:
        th = "" if r["threshold"] is None else f"{r['threshold']:.3f}"
        print(f"| {r['method']} | {th} | {r['share']:.1%} | {r['acc']:.1%} | {r['params'] / 1e6:.3f}M |")


if __name__ == "__main__":
    r2r.run_main(main)
