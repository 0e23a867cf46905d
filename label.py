"""
label.py: R2R's automatic labeling (R2R Stage 1): at every position of the LLM's greedy response to each prompt,
the router's features and whether the SLM's token there is identical, a neutral difference or divergent.

    python label.py                                   # demo pair, demo training prompts
    python label.py --slm A --llm B --prompts data.jsonl --verifier Qwen/Qwen2.5-72B-Instruct
    torchrun --nproc-per-node 8 label.py ...          # 8 processes (GPUs), chunk k to process k % 8

Per chunk of prompts: 1. the LLM writes greedy responses; 2. one SLM pass over them gives features and argmax;
3. from each mismatch the LLM continues after the SLM's token, on its cached prefix; 4. a verifier (evaluate.py:
final answers, or a judge model) calls it neutral or divergent. Each chunk is a shard in --out/shards, written
atomically, named by its rows' hash: a rerun, at any world size, labels only missing or edited chunks.
"""

import collections
import datetime
import hashlib
import json
import os
import pathlib
import random
import re
import resource
import shutil
import time
from typing import NamedTuple

import datasets
import torch
from accelerate import PartialState
from transformers import DynamicCache

import r2r
from evaluate import (
    Judge,
    judge_prompt,
    parse_judge,
    sentence_view,
    verify_by_answer,
)  # the verifier (step 4)

PAPER_SHARES = {
    "identical": 0.89,
    "neutral": 0.06,
    "divergent": 0.05,
}  # the authors' R1-1.5B vs R1-32B
SENTENCE_END = re.compile(r"[.!?;\n]")
SLICE_LOGITS = 2**24  # step 2 holds at most this many logits at once (32 MiB in bf16), whatever V

# ----------------------------------------------------------------------------- the steps


class Reply(NamedTuple):
    """A greedy response: the prompt's ids, the response's, and whether it ended at a stop id."""

    prompt_ids: list
    response_ids: list
    finished: bool


def greedy_batch(model, tok, prompts, max_new_tokens, chat=True, *, engine=None, thinking=None):
    """Greedy Replies of one model to many prompts: decode_batch's raw argmax (not generate()'s generation_config),
    within the stop ids and positions of `engine` (a pair's, whose LLM is `model`; default: the model's own)."""
    rows = [r2r.encode_prompt(tok, p, chat, thinking=thinking) for p in prompts]
    engine = engine or r2r.EagerEngine(None, model, tok)
    batch = r2r.decode_batch(engine, None, rows, max_new_tokens=max_new_tokens, mode="llm")
    return [
        Reply(r, t.tokens, bool(t.tokens) and t.tokens[-1] in engine.eos)
        for r, t in zip(rows, batch.traces)
    ]


class Positions(NamedTuple):
    """Step 2's reading of one response at its n positions: SLM argmax (n ints), hidden states (n, H), top-k (n, k)."""

    argmax: list
    hidden: torch.Tensor
    topk: torch.Tensor


class Branch(NamedTuple):
    """A mismatch to continue from (step 3): response `seq`, cut after `cut` tokens, where the SLM writes `token`."""

    seq: int
    cut: int
    token: int


def pad_right(seqs, device):
    """Right-padded ids (B, T) and mask (B, T). Padding is masked, so id 0 serves: a tokenizer may have no pad."""
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)  # (B, T)
    return ids, torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)


@torch.no_grad()
def slm_positions(slm, tok, seqs, starts, k):
    """Step 2, teacher forcing: one batched, right-padded SLM pass -> Positions of each response. lm_head runs over
    slices of SLICE_LOGITS // V positions: B x T x V logits would take 83 GB at 64 x 4.3K x 152K."""
    ids, mask = pad_right(seqs, slm.device)
    hidden = r2r.forward(slm, ids, None, last=True, attention_mask=mask)[
        0
    ]  # (B, T, H); logits in slices below
    step, out = max(1, SLICE_LOGITS // len(tok)), []
    for i, (s, p) in enumerate(zip(seqs, starts)):
        parts = []
        for h in hidden[i, p - 1 : len(s) - 1].split(
            step
        ):  # (n, H) slices of the states that predict the response
            lg = slm.get_output_embeddings()(h)[:, : len(tok)]  # (n, V)
            parts.append(
                [
                    x.cpu()
                    for x in (lg.argmax(-1),) + r2r.router_inputs(slm, h, lg, lg.argmax(-1), k)[:2]
                ]
            )
        argmax, h, topk = (
            torch.cat(x) for x in zip(*parts)
        )  # (n,), (n, H), (n, k) for the whole response
        out.append(Positions(argmax.tolist(), h, topk))
    return out


def branch_batches(branches, max_new, budget):
    """Consecutive branches, batched so that size x (longest prefix + max_new) <= `budget`: the KV cache it holds."""
    batch = []
    for br in branches:
        if batch and (len(batch) + 1) * (max(b.cut for b in batch + [br]) + max_new) > budget:
            yield batch
            batch = []
        batch.append(br)
    yield from [batch] if batch else []


@torch.no_grad()
def continue_branches(llm, tok, seqs, branches, stop, max_new, budget, *, max_tokens):
    """Step 3: the LLM continues each Branch from seqs[seq][:cut] + [token] until `stop(tokens)`, max_new tokens or
    max_tokens positions -> [(tokens, stopped)], on the first `cut` positions of one teacher-forced pass's cache."""
    ids, mask = pad_right(seqs, llm.device)
    full = DynamicCache()
    llm.base_model(input_ids=ids, attention_mask=mask, cache=full, use_cache=True)
    results = []
    for batch in branch_batches(branches, max_new, budget):
        L = max(b.cut for b in batch)
        cache = DynamicCache()
        for layer, kv in enumerate(full.layers):
            k, v = (
                torch.cat(
                    [
                        torch.nn.functional.pad(
                            x[b.seq : b.seq + 1, :, : b.cut], (0, 0, L - b.cut, 0)
                        )
                        for b in batch
                    ]
                )
                for x in (kv.keys, kv.values)
            )  # (B, heads, L, head_dim), left-padded
            cache.update(k, v, layer)
        mask = torch.tensor(
            [[0] * (L - b.cut) + [1] * b.cut for b in batch], device=llm.device
        )  # (B, L)
        last = torch.tensor([[b.token] for b in batch], device=llm.device)  # (B, 1)
        pos = torch.tensor([[b.cut] for b in batch], device=llm.device)  # (B, 1): true positions
        outs = [[b.token] for b in batch]
        for _ in range(max_new):
            live = [
                not stop(o) and b.cut + len(o) < max_tokens for b, o in zip(batch, outs)
            ]  # one more token fits
            if not any(live):
                break
            mask = torch.cat([mask, torch.ones_like(last)], dim=1)
            _, logits = r2r.forward(llm, last, cache, attention_mask=mask, position_ids=pos)
            last = logits[:, -1, : len(tok)].argmax(-1, keepdim=True).to(llm.device)  # (B, 1)
            pos = (pos + 1).clamp(
                max=max_tokens - 1
            )  # (B, 1): only rows that stopped reach the clamp
            for o, t, alive in zip(outs, last[:, 0].tolist(), live):
                if alive:
                    o.append(t)
        results += [(o, stop(o)) for o in outs]
    return results


def peak_memory_gib(device):
    """Peak memory since torch.cuda.reset_peak_memory_stats(), over the GPUs; else the process's peak RSS so far."""
    if device.type == "cuda":
        return (
            sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
            / 2**30
        )
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Steps:
    """Per step of labeling: its seconds in this run and its peak memory (reset between steps on a GPU)."""

    NAMES = ("1 LLM responses", "2 SLM features", "3 continuations", "4 verifier")

    def __init__(self, device):
        self.seconds, self.peak, self.device, self.t = (
            collections.Counter(),
            collections.Counter(),
            device,
            0,
        )

    def done(self, i):
        """Step i ends now: it began at the end of step i - 1 (step 1: when label_chunk set self.t)."""
        self.seconds[i] += time.perf_counter() - self.t
        self.peak[i] = max(self.peak[i], peak_memory_gib(self.device))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()


def label_chunk(slm, llm, tok, rows, args, *, judge, engine, ends, steps):
    """The four steps for a chunk of prompts, with engine's stop ids and positions -> (dataset columns, drop counts)."""
    stats, eos, steps.t = collections.Counter(), engine.eos, time.perf_counter()
    # 1. The LLM's greedy responses, as token ids; only finished ones are labeled, as the authors do.
    replies = greedy_batch(
        llm,
        tok,
        [r["prompt"] for r in rows],
        args.max_new_tokens,
        not args.no_chat_template,
        engine=engine,
    )
    kept = [i for i, r in enumerate(replies) if r.finished or args.keep_unfinished]
    ids, keep = [rows[i]["id"] for i in kept], [replies[i] for i in kept]
    stats["unfinished responses"] += len(rows) - len(keep)
    steps.done(0)
    if not keep:
        return {}, stats
    # 2. Teacher-forced SLM pass: features and argmax at every response position.
    seqs, starts = [r.prompt_ids + r.response_ids for r in keep], [len(r.prompt_ids) for r in keep]
    slm_out = slm_positions(slm, tok, seqs, starts, args.top_k)
    steps.done(1)
    # 3. Continue the LLM from every mismatch: to the end (answer check) or two sentences on (judge).
    branches = [
        Branch(b, starts[b] + j, s)
        for b, (pos, r) in enumerate(zip(slm_out, keep))
        for j, (s, l) in enumerate(zip(pos.argmax, r.response_ids))
        if s != l
    ]
    stop = (
        (lambda o: o[-1] in eos)
        if judge is None
        else (lambda o: sum(t in ends for t in o) >= 2 or o[-1] in eos)
    )
    cont = continue_branches(
        llm,
        tok,
        seqs,
        branches,
        stop,
        args.max_new_tokens if judge is None else args.judge_span,
        args.branch_tokens,
        max_tokens=engine.max_tokens,
    )
    steps.done(2)
    # 4. Verify: neutral (0) or divergent (1); unverifiable mismatches are dropped and counted.
    at = [
        (br.seq, br.cut - starts[br.seq]) for br in branches
    ]  # (response, position) of each mismatch
    if judge is None:
        verdicts = [
            verify_by_answer(tok, keep[b].response_ids, j, branch) if finished else None
            for (b, j), (branch, finished) in zip(at, cont)
        ]
    else:
        prompts, replies = (
            [
                judge_prompt(*sentence_view(tok, keep[b].response_ids, j, branch, ends))
                for (b, j), (branch, _) in zip(at, cont)
            ],
            [],
        )
        for a in range(
            0, len(prompts), args.judge_batch_size
        ):  # thinking off: no verdict in 16 tokens otherwise
            replies += greedy_batch(
                judge.model, judge.tok, prompts[a : a + args.judge_batch_size], 16, thinking=False
            )
        verdicts = [parse_judge(judge.tok.decode(reply.response_ids)) for reply in replies]
    verdicts = dict(zip(at, verdicts))
    stats["verifier drops"] += sum(v is None for v in verdicts.values())
    steps.done(3)
    out = collections.defaultdict(list)
    for b, (r, pos) in enumerate(zip(keep, slm_out)):
        for j, (s, l) in enumerate(zip(pos.argmax, r.response_ids)):
            if s == l or verdicts[b, j] is not None:
                kind = "identical" if s == l else ("neutral", "divergent")[verdicts[b, j]]
                for key, value in dict(
                    prompt_id=ids[b],
                    position=j,
                    slm_token=s,
                    llm_token=l,
                    kind=kind,
                    label=int(kind == "divergent"),
                    hidden=pos.hidden[j].tolist(),
                    topk=pos.topk[j].tolist(),
                ).items():
                    out[key].append(value)
    return out, stats


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = r2r.parser(__doc__, router=False, prompts="train.jsonl")
    p.add_argument(
        "--verifier", default="answer", help="'answer' compares final answers, else a judge model"
    )
    p.add_argument("--limit", type=int, help="label only this many prompts")
    p.add_argument("--seed", type=int, help="shuffle the prompts with this seed before --limit")
    p.add_argument(
        "--out", default="labels", help="output folder; rerun with the same arguments to resume"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="longest LLM response; longer ones are dropped",
    )
    p.add_argument(
        "--keep-unfinished",
        action="store_true",
        help="label cut responses too (the authors drop them)",
    )
    p.add_argument(
        "--judge-span", type=int, default=64, help="most tokens a branch is continued for the judge"
    )
    # Sizes for one 80 GB GPU beside the README recipe's 47 GB of weights: lower them if you run out of memory.
    p.add_argument("--batch-size", type=int, default=64, help="prompts per chunk, each a shard")
    p.add_argument(
        "--branch-tokens",
        type=int,
        default=65536,
        help="step 3's cached tokens at once (Qwen3-8B: 9.4 GB)",
    )
    p.add_argument(
        "--judge-batch-size",
        type=int,
        default=32,
        help="judge prompts at once (a 14B judge: 3.8 GB)",
    )
    p.add_argument(
        "--top-k", type=int, default=100, help="top-k logits stored as router features (paper: 100)"
    )
    args = p.parse_args(argv)
    r2r.check_args(
        args,
        limit=1,
        max_new_tokens=1,
        judge_span=1,
        batch_size=1,
        branch_tokens=1,
        judge_batch_size=1,
        top_k=1,
    )
    return args


def shard_name(index, rows):
    """A chunk's shard: its index, then a hash of its rows (ids, prompts, answers): "00003-1f2e3d4c5b6a7980"."""
    text = json.dumps([[r["id"], r["prompt"], r["answer"]] for r in rows])
    return f"{index:05d}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def main(argv=None):
    args = parse_args(argv)
    ranks = PartialState(  # torchrun's processes (one without it), each on its own GPU, waiting up to a day at the end
        cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(days=1)
    )
    rows = r2r.read_prompts(args.prompts, args.split, args.prompt_field, args.answer_field)
    rows = [dict(r, id=i) for i, r in enumerate(rows)]
    if args.seed is not None:
        random.Random(args.seed).shuffle(rows)
    rows = rows[: args.limit]
    if args.verifier == "answer" and all(r["answer"] is None for r in rows):
        raise r2r.R2RError(
            f"--verifier answer needs answers, and {args.prompts} has no '{args.answer_field}' "
            "field: name it with --answer-field or use a judge model"
        )
    device, dtype = r2r.pick_device(args.device, args.dtype)
    slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype, device_map=args.device_map)
    engine = r2r.EagerEngine(
        slm, llm, tok
    )  # decode's stop ids and the models' positions: every greedy path alike
    full = [
        r["id"] + 1
        for r in rows  # refused now, not in the middle of the run
        if len(r2r.encode_prompt(tok, r["prompt"], not args.no_chat_template)) >= engine.max_tokens
    ]
    if full:
        raise r2r.R2RError(
            f"{args.prompts} rows {', '.join(map(str, full[:10]))} leave no room in the models' "
            f"{engine.max_tokens} positions: shorten or drop them"
        )
    args.top_k = min(args.top_k, len(tok))
    # Resume only with the arguments that change a row (in meta.json, with the dtype and the SLM's fingerprint).
    meta = {
        k: v
        for k, v in vars(args).items()
        if k not in ("out", "device", "device_map", "branch_tokens", "judge_batch_size", "dtype")
    }
    meta = json.loads(
        json.dumps(dict(meta, n=len(rows), dtype=str(dtype), fingerprint=r2r.fingerprint(slm, tok)))
    )
    meta_file, shards = pathlib.Path(args.out, "meta.json"), os.path.join(args.out, "shards")
    os.makedirs(shards, exist_ok=True)
    old = json.loads(meta_file.read_text()) if meta_file.exists() else meta
    if old != meta:
        changed = "; ".join(
            f"{k} {old.get(k)!r} -> {meta.get(k)!r}"
            for k in meta | old
            if old.get(k) != meta.get(k)
        )
        raise r2r.R2RError(
            f"{args.out} holds labels made with other arguments ({changed}): rerun with the same ones, "
            "use another --out or delete it"
        )
    if (
        not meta_file.exists()
    ):  # the first run writes it, atomically; every rank the same, before any shard
        meta_file.with_suffix(f".{ranks.process_index}.tmp").write_text(json.dumps(meta, indent=2))
        os.replace(meta_file.with_suffix(f".{ranks.process_index}.tmp"), meta_file)
    judge = (
        None
        if args.verifier == "answer"
        else Judge(
            r2r.load_model(args.verifier, device, dtype, device_map=args.device_map),
            r2r.load_tokenizer(args.verifier),
        )
    )
    ends = {i for i in range(len(tok)) if SENTENCE_END.search(tok.decode([i]))} | engine.eos
    steps = Steps(device)
    datasets.disable_progress_bars()  # a log file gets one line per chunk, no bars
    for c in range(0, len(rows), args.batch_size):
        chunk, index = rows[c : c + args.batch_size], c // args.batch_size
        path = os.path.join(shards, shard_name(index, chunk))
        if index % ranks.num_processes != ranks.process_index or os.path.exists(path):
            continue  # another rank's chunk (every world size shares them alike), or labeled already
        for stale in (
            s for s in os.listdir(shards) if re.fullmatch(rf"{index:05d}(-\w+)?(\.tmp)?", s)
        ):
            if not stale.endswith(".tmp"):  # else a write that was killed
                r2r.status(
                    f"note: rows of {stale} were edited since it was labeled: labeling them again"
                )
            shutil.rmtree(os.path.join(shards, stale))
        out, stats = label_chunk(
            slm, llm, tok, chunk, args, judge=judge, engine=engine, ends=ends, steps=steps
        )
        ds = datasets.Dataset.from_dict(out or {k: [] for k in FEATURES}, features=FEATURES)
        ds.save_to_disk(path + ".tmp")
        with open(os.path.join(path + ".tmp", "stats.json"), "w") as f:
            json.dump(stats, f)
        os.replace(path + ".tmp", path)
        r2r.status(f"labeled {c + len(chunk)}/{len(rows)} prompts: {path}, {len(ds)} positions")
    ranks.wait_for_everyone()
    if ranks.is_main_process:
        summarize(args.out, tok, steps)


def load_labels(folder):
    """A label.py folder: (its meta.json, every finished shard as one dataset)."""
    meta_file = pathlib.Path(folder, "meta.json")
    if not meta_file.is_file():
        raise r2r.R2RError(
            f"no labels in {folder} (no meta.json): give a folder that label.py wrote"
        )
    paths = sorted(
        os.path.join(folder, "shards", s)
        for s in os.listdir(os.path.join(folder, "shards"))
        if not s.endswith(".tmp")
    )
    # A chunk that kept no row (every response unfinished) is a shard without data files.
    parts = [
        datasets.load_from_disk(p)
        for p in paths
        if any(f.endswith(".arrow") for f in os.listdir(p))
    ]
    meta = json.loads(meta_file.read_text())
    return meta, datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({})


FEATURES = datasets.Features(
    dict(
        prompt_id=datasets.Value("int64"),
        position=datasets.Value("int64"),
        slm_token=datasets.Value("int64"),
        llm_token=datasets.Value("int64"),
        kind=datasets.Value("string"),
        label=datasets.Value("int64"),
        hidden=datasets.Sequence(datasets.Value("float32")),
        topk=datasets.Sequence(datasets.Value("float32")),
    )
)


def summarize(folder, tok, steps):
    ds, stats = load_labels(folder)[1], collections.Counter()
    for s in sorted(os.listdir(os.path.join(folder, "shards"))):
        with open(os.path.join(folder, "shards", s, "stats.json")) as f:
            stats.update(json.load(f))
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(stats.items())) or "nothing"
    if len(ds) == 0:
        raise r2r.R2RError(
            f"no position labeled in {folder} (dropped: {dropped}): raise --max-new-tokens, pass "
            "--keep-unfinished or label more prompts"
        )
    kinds, n = collections.Counter(ds["kind"]), len(ds)
    print(f"{n} positions from {len(set(ds['prompt_id']))} responses in {folder}")
    for k in ("identical", "neutral", "divergent"):
        print(f"  {k:9s} {kinds[k]:7d}  {kinds[k] / n:6.2%}   (paper: {PAPER_SHARES[k]:.0%})")
    mism = kinds["neutral"] + kinds["divergent"]
    print(
        f"  mismatches {mism} ({mism / n:.2%} of positions): {kinds['neutral'] / max(mism, 1):.0%} neutral, "
        f"{kinds['divergent'] / max(mism, 1):.0%} divergent"
    )
    pairs = collections.Counter(
        (tok.decode([s]), tok.decode([l]))
        for s, l, k in zip(ds["slm_token"], ds["llm_token"], ds["kind"])
        if k == "neutral"
    )
    print(
        "  commonest neutral (SLM / LLM): "
        + ", ".join(f"{a!r}/{b!r} {v}" for (a, b), v in pairs.most_common(6))
    )
    print(f"  dropped: {dropped}")
    print(
        "  time, peak memory per step (this run): "
        + ", ".join(
            f"{steps.NAMES[i]} {v:.0f}s {steps.peak[i]:.2f} GiB"
            for i, v in sorted(steps.seconds.items())
        )
    )


if __name__ == "__main__":
    r2r.run_main(main)
