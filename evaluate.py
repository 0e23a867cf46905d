"""
evaluate.py: R2R's trade-off, accuracy against LLM share, on prompts with checkable answers.

    python evaluate.py                       # demo pair, demo/router, the 500 demo test problems

Rows: SLM only, LLM only, R2R at the router's saved threshold and at a sweep of thresholds,
and, at the LLM share each R2R row reached, routing by SLM entropy and at random (the
authors' baselines, METHOD.md). Each baseline's threshold is set so that it would route
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


def decode_all(slm, llm, router, tok, prompts, args, desc, **kw):
    return [r2r.decode(slm, llm, router, tok, p, args.max_new_tokens, **kw)
            for p in tqdm(prompts, desc=desc, leave=False)]


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
    p.add_argument("--slm", default=os.path.join(r2r.DEMO, "slm"), help="small model: hub name or local folder")
    p.add_argument("--llm", default=os.path.join(r2r.DEMO, "llm"), help="large model sharing the SLM's tokenizer")
    p.add_argument("--router", default=os.path.join(r2r.DEMO, "router"), help="router folder from train_router.py")
    p.add_argument("--prompts", default=os.path.join(r2r.DEMO, "test.jsonl"), help="JSON/JSONL with prompt, answer")
    p.add_argument("--split", default="test", help="split of a hub dataset")
    p.add_argument("--prompt-field", default="prompt", help="field holding the prompt")
    p.add_argument("--answer-field", default="answer", help="field holding the answer")
    p.add_argument("--limit", type=int, default=None, help="evaluate only this many prompts")
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.2, 0.5, 0.8], help="router thresholds to sweep")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest response")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw, without the chat template")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best one present)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on cuda, else fp32)")
    args = p.parse_args(argv)
    if any(not 0 <= t <= 1 for t in args.thresholds) or args.max_new_tokens < 1:
        raise r2r.R2RError("--thresholds must lie in [0, 1] and --max-new-tokens be at least 1")

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

    results = [row("SLM only", None, slm_traces := decode_all(slm, llm, None, tok, prompts, args, "SLM", mode="slm")),
               row("LLM only", None, decode_all(slm, llm, None, tok, prompts, args, "LLM", mode="llm"))]
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
