"""
label.py: R2R's automatic labeling (R2R Stage 1): at every position of the LLM's greedy response
to each prompt, the router's features and whether the SLM's token there is identical, a neutral
difference or divergent.

    python label.py                                   # demo pair, demo training prompts
    python label.py --slm A --llm B --prompts data.jsonl --verifier Qwen/Qwen2.5-72B-Instruct
    torchrun --nproc-per-node 8 label.py ...          # 8 processes (GPUs), chunk k to process k % 8

Per chunk of prompts: 1. the LLM writes greedy responses; 2. one SLM pass over them gives features
and argmax; 3. from each mismatch the LLM continues after the SLM's token, on its cached prefix;
4. a verifier (r2r.same_answer on final answers, or a judge model) calls it neutral or divergent.
Each chunk is a shard in --out/shards, written atomically, named by its rows' hash: a rerun, at any
world size, labels only missing or edited chunks.
"""

import collections
import datetime
import functools
import glob
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import time
from typing import NamedTuple

import pyarrow as pa
import torch
import torch.nn.functional as F
from accelerate import PartialState
from transformers import DynamicCache

import r2r

# The authors' shares, R1-1.5B against R1-32B.
PAPER_SHARES = {"identical": 0.89, "neutral": 0.06, "divergent": 0.05}
SENTENCE_END = re.compile(r"[.!?;\n]")
# Step 4's verdicts: label 1 = divergent (R2R Stage 1); None, unverifiable, drops the position.
VERDICTS = {0: "neutral", 1: "divergent", None: None}
# Step 2 holds at most this many logits at once (32 MiB in bf16), whatever the vocabulary: all
# B x T x V would take 83 GB at 64 x 4.3K x 152K.
SLICE_LOGITS = 2**24

# ----------------------------------------------------------------------------- the steps


class Reply(NamedTuple):
    """A greedy response: the prompt's ids, the response's, and whether it ended at a stop id."""

    prompt_ids: list
    response_ids: list
    finished: bool


def greedy_batch(model, tok, prompts, max_new_tokens, chat=True, *, engine=None, thinking=None):
    """Greedy Replies of one model to many prompts: decode_batch's raw argmax (not generate()'s
    generation_config), within the stop ids and positions of `engine` (a pair's, whose LLM is
    `model`; default: the model's own)."""
    rows = [r2r.encode_prompt(tok, p, chat, thinking=thinking) for p in prompts]
    engine = engine or r2r.EagerEngine(None, model, tok)
    batch = r2r.decode_batch(engine, None, rows, max_new_tokens=max_new_tokens, mode="llm")
    return [
        Reply(r, t.tokens, bool(t.tokens) and t.tokens[-1] in engine.limits.eos)
        for r, t in zip(rows, batch.traces)
    ]


class Positions(NamedTuple):
    """Step 2's reading of one response at its n positions: the SLM's argmax (n ints), hidden
    states (n, H) and top-k logits (n, k)."""

    argmax: list
    hidden: torch.Tensor
    topk: torch.Tensor


class Branch(NamedTuple):
    """A mismatch to continue from (step 3): sequence `seq` after `prefix` = prompt + j tokens
    (a mismatch at response position j), where the SLM writes `token`."""

    seq: int
    prefix: int
    token: int


def pad_right(seqs, device):
    """Right-padded ids (B, T) and mask (B, T). Padding is masked, so id 0 serves: a tokenizer
    may have no pad token."""
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)  # (B, T)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)
    return ids, mask


@torch.no_grad()
def slm_positions(slm, tok, seqs, starts, k, dtype):
    """Step 2, teacher forcing: one batched, right-padded SLM pass -> Positions of each response,
    the features in the shards' dtype; lm_head runs over SLICE_LOGITS // V positions at a time."""
    ids, mask = pad_right(seqs, slm.device)
    # (B, T, H); the logits follow in slices.
    hidden = r2r.forward(slm, ids, None, last=True, attention_mask=mask)[0]
    step = max(1, SLICE_LOGITS // len(tok))
    out = []
    for i, (s, p) in enumerate(zip(seqs, starts)):
        parts = []
        # (n, H) slices of the states that predict the response.
        for h in hidden[i, p - 1 : len(s) - 1].split(step):
            lg = slm.get_output_embeddings()(h)[:, : len(tok)]  # (n, V)
            argmax = lg.argmax(-1)
            features = r2r.router_inputs(slm, h, lg, argmax, k)[:2]
            parts.append([argmax.cpu()] + [x.to("cpu", dtype) for x in features])
        # (n,), (n, H), (n, k) for the whole response.
        argmax, h, topk = (torch.cat(x) for x in zip(*parts))
        out.append(Positions(argmax.tolist(), h, topk))
    return out


def branch_batches(branches, max_new, budget):
    """Consecutive branches, batched so that size x (longest prefix + max_new) <= `budget`: the
    KV cache the batch holds."""
    batch = []
    for br in branches:
        longest = max(b.prefix for b in batch + [br])
        if batch and (len(batch) + 1) * (longest + max_new) > budget:
            yield batch
            batch = []
        batch.append(br)
    yield from [batch] if batch else []


def prefix_cache(full, batch, device):
    """A DynamicCache of each Branch's prefix, cut from the teacher-forced pass's cache `full`
    and left-padded to the longest -> (cache, mask (B, L) on `device`)."""
    L = max(b.prefix for b in batch)

    def padded(x):
        # (B, heads, L, head_dim), left-padded.
        return torch.stack([F.pad(x[b.seq, :, : b.prefix], (0, 0, L - b.prefix, 0)) for b in batch])

    cache = DynamicCache()
    for layer, kv in enumerate(full.layers):
        cache.update(padded(kv.keys), padded(kv.values), layer)
    mask = [[0] * (L - b.prefix) + [1] * b.prefix for b in batch]
    return cache, torch.tensor(mask, device=device)  # (B, L)


@torch.no_grad()
def continue_branches(llm, tok, seqs, branches, stop, max_new, budget, *, positions):
    """Step 3: the LLM continues each Branch from seqs[seq][:prefix] + [token] until
    `stop(tokens)`, max_new tokens or the last of `positions` -> [(tokens, stopped)], on the
    prefixes of one teacher-forced pass's cache."""
    ids, mask = pad_right(seqs, llm.device)
    full = DynamicCache()
    llm.base_model(input_ids=ids, attention_mask=mask, cache=full, use_cache=True)
    results = []
    for batch in branch_batches(branches, max_new, budget):
        cache, mask = prefix_cache(full, batch, llm.device)
        last = torch.tensor([[b.token] for b in batch], device=llm.device)  # (B, 1)
        # (B, 1): each branch's true position.
        pos = torch.tensor([[b.prefix] for b in batch], device=llm.device)
        outs = [[b.token] for b in batch]
        for _ in range(max_new):
            # A branch goes on while it has not stopped and one more token fits.
            live = [not stop(o) and b.prefix + len(o) < positions for b, o in zip(batch, outs)]
            if not any(live):
                break
            mask = torch.cat([mask, torch.ones_like(last)], dim=1)
            _, logits = r2r.forward(llm, last, cache, attention_mask=mask, position_ids=pos)
            last = logits[:, -1, : len(tok)].argmax(-1, keepdim=True).to(llm.device)  # (B, 1)
            # Only rows that stopped reach the clamp.
            pos = (pos + 1).clamp(max=positions - 1)
            for o, t, alive in zip(outs, last[:, 0].tolist(), live):
                if alive:
                    o.append(t)
        results += [(o, stop(o)) for o in outs]
    return results


# ----------------------------------------------------------------------------- step 4, the verifier


def verify_by_answer(tok, response, j, branch):
    """The same final answer (r2r.same_answer) from the LLM's own response and from the branch
    at position j: neutral (0), else divergent (1); None where the response has no final answer."""
    ref = tok.decode(response, skip_special_tokens=True)
    alt = tok.decode(response[:j] + branch, skip_special_tokens=True)
    if r2r.final_answer(ref) is None:
        return None
    return int(not r2r.same_answer(alt, ref))


# The authors' question (R2R Stage 1), in our words.
JUDGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judge_prompt.txt")


@functools.lru_cache
def read_judge_file(path):
    """The judge's question template, read once per file, not once per question."""
    return pathlib.Path(path).read_text(encoding="utf-8").rstrip("\n")


def judge_prompt(context, a, b):
    """The judge's question from JUDGE_FILE; `a` and `b` carry the << >> marks; the last 1000
    characters of context. A file it cannot read, or with other fields, is one line."""
    try:
        return read_judge_file(JUDGE_FILE).format(context=context[-1000:], a=a, b=b)
    # Another field is a KeyError or an IndexError; a lone brace or bad UTF-8 a ValueError.
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise r2r.R2RError(
            f"cannot use {JUDGE_FILE} ({e!r}): its fields are {{context}}, {{a}} and {{b}}; write "
            "other braces twice"
        )


def sentence_view(tok, response, j, branch, ends):
    """(context, A, B) for the judge: the text before the sentence that holds position j, then
    that sentence and the next from the LLM's response (A) and from the branch (B), the
    divergence point marked << >>."""
    start = max([i + 1 for i in range(j) if response[i] in ends], default=0)

    def sentences(tail):
        cut = [i for i, t in enumerate(tail) if t in ends]
        tail = tail[: cut[1] + 1] if len(cut) > 1 else tail
        head = tok.decode(response[start:j])
        return f"{head} <<{tok.decode(tail[:1])}>> {tok.decode(tail[1:])}"

    return tok.decode(response[:start]), sentences(response[j:]), sentences(branch)


def parse_judge(reply):
    """'Output: 1' -> 1, 'output:0' -> 0; anything else -> None (dropped, never guessed)."""
    m = re.findall(r"output\s*:\s*\**\s*([01])\b", reply, flags=re.IGNORECASE)
    return int(m[-1]) if m else None


def judge_all(model, tok, prompts, batch_size):
    """A judge model's verdicts on its questions, batch_size at a time. Thinking is off: a thinking
    judge gives no verdict in 16 tokens."""
    replies = []
    for a in range(0, len(prompts), batch_size):
        replies += greedy_batch(model, tok, prompts[a : a + batch_size], 16, thinking=False)
    return [parse_judge(tok.decode(reply.response_ids)) for reply in replies]


# ----------------------------------------------------------------------------- one chunk


class Steps:
    """Each labeling step's seconds in this run and peak memory (reset between steps on a GPU)."""

    NAMES = ("1 LLM responses", "2 SLM features", "3 continuations", "4 verifier")

    def __init__(self, device):
        self.seconds = collections.Counter()
        self.peak = collections.Counter()
        self.device = device
        self.t = 0

    def done(self, i):
        """Step i ends now; it began when step i - 1 ended (step 1: when label_chunk set t)."""
        self.seconds[i] += time.perf_counter() - self.t
        self.peak[i] = max(self.peak[i], r2r.peak_memory_gib(self.device))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()


def label_chunk(slm, llm, tok, rows, args, *, judge, engine, ends, steps):
    """The four steps for a chunk of prompts, within the engine's stop ids and positions, verified
    by final answers or by `judge` (questions -> verdicts) -> (dataset columns, drop counts)."""
    steps.t = time.perf_counter()
    # 1. The LLM's greedy responses; only finished ones are labeled, as the authors do.
    prompts = [r["prompt"] for r in rows]
    chat = not args.no_chat_template
    replies = greedy_batch(llm, tok, prompts, args.max_new_tokens, chat, engine=engine)
    kept = [i for i, r in enumerate(replies) if r.finished or args.keep_unfinished]
    keep = [replies[i] for i in kept]
    stats = {"unfinished responses": len(rows) - len(keep)}
    steps.done(0)
    if not keep:
        return {}, stats
    # 2. Teacher-forced SLM pass: features and argmax at every response position.
    seqs = [r.prompt_ids + r.response_ids for r in keep]
    starts = [len(r.prompt_ids) for r in keep]
    slm_out = slm_positions(slm, tok, seqs, starts, args.top_k, getattr(torch, args.feature_dtype))
    steps.done(1)
    # 3. The LLM continues from every mismatch: to the end, or two sentences on for a judge.
    branches = [
        Branch(b, starts[b] + j, s)
        for b, (pos, r) in enumerate(zip(slm_out, keep))
        for j, (s, t) in enumerate(zip(pos.argmax, r.response_ids))
        if s != t
    ]

    def stop(o):
        # The answer check needs the whole branch; the judge reads two sentences.
        return o[-1] in engine.limits.eos or (judge is not None and sum(t in ends for t in o) >= 2)

    span = args.max_new_tokens if judge is None else args.judge_span
    cont = continue_branches(
        llm, tok, seqs, branches, stop, span, args.branch_tokens, positions=engine.limits.positions
    )
    steps.done(2)
    # 4. Verify: neutral (0) or divergent (1); unverifiable mismatches are dropped and counted.
    # (response, position) of each mismatch:
    at = [(br.seq, br.prefix - starts[br.seq]) for br in branches]
    if judge is None:
        verdicts = [
            verify_by_answer(tok, keep[b].response_ids, j, branch) if finished else None
            for (b, j), (branch, finished) in zip(at, cont)
        ]
    else:
        questions = [
            judge_prompt(*sentence_view(tok, keep[b].response_ids, j, branch, ends))
            for (b, j), (branch, _) in zip(at, cont)
        ]
        verdicts = judge(questions)
    stats["verifier drops"] = verdicts.count(None)
    kinds = {bj: VERDICTS[v] for bj, v in zip(at, verdicts)}
    steps.done(3)
    out = collections.defaultdict(list)
    for b, (i, r, pos) in enumerate(zip(kept, keep, slm_out)):
        kind = [kinds.get((b, j), "identical") for j in range(len(pos.argmax))]
        js = [j for j, k in enumerate(kind) if k]
        out["prompt_id"] += [rows[i]["id"]] * len(js)
        out["prompt_hash"] += [prompt_key(rows[i]["prompt"])] * len(js)
        out["position"] += js
        out["slm_token"] += [pos.argmax[j] for j in js]
        out["llm_token"] += [r.response_ids[j] for j in js]
        out["kind"] += [kind[j] for j in js]
        out["label"] += [int(kind[j] == "divergent") for j in js]
        # The features of the positions kept, a tensor per response: no object per position.
        out["hidden"].append(pos.hidden[js])
        out["topk"].append(pos.topk[js])
    return out, stats


def write_shard(path, columns, stats):
    """A chunk's shard, atomically: stats.json (drop counts) and data.arrow, an Arrow stream of its
    columns, each response's feature tensors (n, H) and (n, k) as they are, a record batch of
    fixed-size lists of their dtype: writing costs no copy of them. -> rows written."""
    with r2r.atomic(path) as tmp:
        os.makedirs(tmp)
        if columns.get("kind"):
            arrays = {k: pa.array(v) for k, v in columns.items() if k not in ("hidden", "topk")}
            for k in ("hidden", "topk"):
                fixed = pa.FixedSizeListArray.from_arrays
                arrays[k] = pa.chunked_array(
                    [fixed(x.numpy().ravel(), x.shape[1]) for x in columns[k]]
                )
            table = pa.table(arrays)
            with pa.ipc.new_stream(os.path.join(tmp, "data.arrow"), table.schema) as f:
                f.write_table(table)
        pathlib.Path(tmp, "stats.json").write_text(json.dumps(stats))
    return len(columns.get("kind", []))


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = r2r.parser(__doc__, router=False, prompts="train.jsonl")
    p.add_argument("--verifier", default="answer", help="'answer' (final answers) or a judge model")
    p.add_argument("--limit", type=int, help="label only this many prompts")
    p.add_argument("--seed", type=int, help="shuffle the prompts with this seed before --limit")
    p.add_argument("--out", default="labels", help="output folder; rerun the same to resume")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest LLM response")
    p.add_argument("--keep-unfinished", action="store_true", help="label cut-off responses too")
    p.add_argument("--judge-span", type=int, default=64, help="most tokens a judge's branch gets")
    # Sizes for one 80 GB GPU beside the README recipe's 47 GB of weights: lower them if you run
    # out of memory.
    p.add_argument("--batch-size", type=int, default=64, help="prompts per chunk, each a shard")
    p.add_argument(
        "--branch-tokens", type=int, default=65536, help="step 3's cached tokens (Qwen3-8B: 9.4 GB)"
    )
    p.add_argument(
        "--judge-batch-size", type=int, default=32, help="judge prompts at once (14B: 3.8 GB)"
    )
    p.add_argument("--top-k", type=int, default=100, help="top-k logits kept (the paper: 100)")
    p.add_argument(
        "--feature-dtype", default="float16", choices=["float16", "float32"], help="shards' dtype"
    )
    args = p.parse_args(argv)
    positive = "limit max_new_tokens judge_span batch_size branch_tokens judge_batch_size top_k"
    r2r.check_args(args, **dict.fromkeys(positive.split(), 1))
    # judge_prompt.txt, checked before any model loads.
    if args.verifier != "answer":
        judge_prompt("", "", "")
    return args


def shard_name(index, rows):
    """A chunk's shard: its index, then a hash of its rows (ids, prompts, answers):
    "00003-1f2e3d4c5b6a7980"."""
    text = json.dumps([[r["id"], r["prompt"], r["answer"]] for r in rows])
    return f"{index:05d}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def prompt_key(text):
    """A prompt's identity for train_router.py's splits, the first 8 bytes of the SHA-256 of its
    text after whitespace normalisation as an int64: "1 +  2" and " 1 + 2" share one."""
    text = " ".join(text.split())
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def check_meta(meta, meta_file, out, rank):
    """Resume only with the arguments that change a row: refuse others in one line; the first
    run writes meta.json, atomically, every rank the same, before any shard."""
    old = r2r.read_json(meta_file, "fingerprint") if meta_file.exists() else meta
    r2r.check_label_format(old, out)
    # Folders from before --limit could grow kept it, and the rows' count, in meta.json.
    old = {k: v for k, v in old.items() if k not in ("limit", "n")}
    if old != meta:
        keys = [k for k in meta | old if old.get(k) != meta.get(k)]
        changed = "; ".join(f"{k} {old.get(k)!r} -> {meta.get(k)!r}" for k in keys)
        raise r2r.R2RError(
            f"{out} holds labels made with other arguments ({changed}): rerun with the same ones, "
            "use another --out or delete it"
        )
    if not meta_file.exists():
        with r2r.atomic(meta_file, f".{rank}.tmp") as tmp:
            pathlib.Path(tmp).write_text(json.dumps(meta, indent=2))


def main(argv=None):
    args = parse_args(argv)
    # torchrun's processes (one without it), each on its own GPU, waiting up to a day at the end.
    ranks = PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(days=1))
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
    r2r.check_writable(args.out, "out")
    device, dtype = r2r.pick_device(args.device, args.dtype)
    slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype, device_map=args.device_map)
    # decode's stop ids and the models' positions: every greedy path alike.
    engine = r2r.EagerEngine(slm, llm, tok)
    chat = not args.no_chat_template
    # Llama 3.1's template writes today's date (strftime_now) into every prompt.
    if chat and re.search("strftime_now|date_string", tok.chat_template or ""):
        r2r.status(
            "note: the chat template writes today's date into every prompt, so chunks labeled on "
            "another day (a resumed run) saw other prompts"
        )
    # Prompts with no room are refused now, not in the middle of the run.
    positions = engine.limits.positions
    full = [
        r["id"] + 1 for r in rows if len(r2r.encode_prompt(tok, r["prompt"], chat)) >= positions
    ]
    if full:
        raise r2r.R2RError(
            f"{args.prompts} rows {', '.join(map(str, full[:10]))} leave no room in the models' "
            f"{positions} positions: shorten or drop them"
        )
    args.top_k = min(args.top_k, len(tok))
    # meta.json: the arguments that change a row, the dtype, the SLM's fingerprint, the format.
    # Not --limit: a larger one adds chunks to the folder, as the shards are named by their rows.
    unchanging = ("out", "device", "device_map", "branch_tokens", "judge_batch_size", "limit")
    meta = {k: v for k, v in vars(args).items() if k not in unchanging}
    meta = dict(meta, dtype=str(dtype), fingerprint=r2r.fingerprint(slm, tok))
    meta["format"] = r2r.LABEL_FORMAT
    meta = json.loads(json.dumps(meta))
    shards = os.path.join(args.out, "shards")
    os.makedirs(shards, exist_ok=True)
    check_meta(meta, pathlib.Path(args.out, "meta.json"), args.out, ranks.process_index)
    judge = None
    if args.verifier != "answer":
        model = r2r.load_model(args.verifier, device, dtype, device_map=args.device_map)
        judge_tok = r2r.load_tokenizer(args.verifier)
        judge = functools.partial(judge_all, model, judge_tok, batch_size=args.judge_batch_size)
    ends = {i for i in range(len(tok)) if SENTENCE_END.search(tok.decode([i]))} | engine.limits.eos
    steps = Steps(device)
    for index, c in enumerate(range(0, len(rows), args.batch_size)):
        chunk = rows[c : c + args.batch_size]
        path = os.path.join(shards, shard_name(index, chunk))
        # Another rank's chunk (every world size shares them alike), or labeled already.
        if index % ranks.num_processes != ranks.process_index or os.path.exists(path):
            continue
        # This chunk's shard of rows since edited, or a write that was killed (a .tmp).
        for stale in glob.glob(os.path.join(glob.escape(shards), f"{index:05d}[-.]*")):
            if not stale.endswith(".tmp"):
                r2r.status(
                    f"note: rows of {stale} changed (edited, or --limit): labeling them again"
                )
            shutil.rmtree(stale)
        out, stats = label_chunk(
            slm, llm, tok, chunk, args, judge=judge, engine=engine, ends=ends, steps=steps
        )
        n = write_shard(path, out, stats)
        r2r.status(f"labeled {c + len(chunk)}/{len(rows)} prompts: {path}, {n} positions")
    ranks.wait_for_everyone()
    if ranks.is_main_process:
        summarize(args.out, tok, steps)


def summarize(folder, tok, steps):
    ds = r2r.load_labels(folder)[1]
    stats = collections.Counter()
    for f in sorted(pathlib.Path(folder, "shards").glob("*/stats.json")):
        stats.update(r2r.read_json(f))
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(stats.items())) or "nothing"
    if len(ds) == 0:
        raise r2r.R2RError(
            f"no position labeled in {folder} (dropped: {dropped}): raise --max-new-tokens, pass "
            "--keep-unfinished or label more prompts"
        )
    kinds = collections.Counter(ds["kind"])
    n = len(ds)
    repeats = len(set(ds["prompt_id"])) - len(set(ds["prompt_hash"]))
    r2r.status(f"{repeats} duplicate prompts (the same text after whitespace normalisation)")
    print(f"{n} positions from {len(set(ds['prompt_id']))} responses in {folder}")
    for k in ("identical", "neutral", "divergent"):
        print(f"  {k:9s} {kinds[k]:7d}  {kinds[k] / n:6.2%}   (paper: {PAPER_SHARES[k]:.0%})")
    mism = kinds["neutral"] + kinds["divergent"]
    shares = ", ".join(f"{kinds[k] / max(mism, 1):.0%} {k}" for k in ("neutral", "divergent"))
    print(f"  mismatches {mism} ({mism / n:.2%} of positions): {shares}")
    pairs = collections.Counter(
        (tok.decode([s]), tok.decode([t]))
        for s, t, k in zip(ds["slm_token"], ds["llm_token"], ds["kind"])
        if k == "neutral"
    )
    common = ", ".join(f"{a!r}/{b!r} {v}" for (a, b), v in pairs.most_common(6))
    print(f"  commonest neutral (SLM / LLM): {common}")
    print(f"  dropped: {dropped}")
    per_step = ", ".join(
        f"{steps.NAMES[i]} {v:.0f}s {steps.peak[i]:.2f} GiB"
        for i, v in sorted(steps.seconds.items())
    )
    print(f"  time, peak memory per step (this run): {per_step or 'none, every chunk was done'}")


if __name__ == "__main__":
    r2r.run_main(main)
