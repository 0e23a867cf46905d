"""
label.py: R2R's automatic labeling (R2R Stage 1). Turns an SLM/LLM pair and some
prompts into a token-level dataset: at every position of the LLM's greedy response, the
router's features and whether the SLM's token there is identical, a neutral difference,
or a divergent one (the reasoning changes).

    python label.py                                   # demo pair, demo training prompts
    python label.py --slm A --llm B --prompts data.jsonl --verifier Qwen/Qwen2.5-72B-Instruct

Per chunk of prompts: 1. the LLM writes greedy responses; 2. one SLM pass over prompt +
response gives features and the SLM's argmax at every position (a mismatch is an argmax
that differs from the LLM's token); 3. from each mismatch the LLM continues greedily after
the SLM's token, reusing its cached prefix; 4. a verifier calls each mismatch neutral or
divergent. Each chunk is written atomically as one shard under --out/shards, so a killed
run continues where it stopped. It does not train anything (train_router.py does).
"""
import collections
import json
import os
import random
import re
import resource
import shutil
import time
from typing import NamedTuple

import datasets
import torch
from tqdm import tqdm
from transformers import DynamicCache

import r2r
from evaluate import extract_answer

PAPER_SHARES = {"identical": 0.89, "neutral": 0.06, "divergent": 0.05}  # the authors' R1-1.5B vs R1-32B
SENTENCE_END = re.compile(r"[.!?;\n]")
SLICE_LOGITS = 2**24  # step 2 holds at most this many logits at once (32 MiB in bf16), whatever V

# ----------------------------------------------------------------------------- the judge

JUDGE_PROMPT = """Two continuations of the same reasoning share the context below and first differ at the point marked << >>.

Context: ...{context}

Sentence A: {a}
Sentence B: {b}

Does the difference change the meaning, reasoning, logic or conclusion (answer 1), or is it superficial, so that both reach the same conclusion (answer 0)?

Example 1:
Sentence A: Let's <<compute>> the sum first.
Sentence B: Let's <<add>> the numbers first.
Output: 0

Example 2:
Sentence A: So the area is <<12>> square units.
Sentence B: So the area is <<15>> square units.
Output: 1

Output: 0 or 1"""


def judge_prompt(context, a, b):
    """The verifier's question (R2R Stage 1, step 4); `a` and `b` already carry the
    << >> marks. Only the last 1000 characters of context are shown."""
    return JUDGE_PROMPT.format(context=context[-1000:], a=a, b=b)


def parse_judge(reply):
    """'Output: 1' -> 1, 'output:0' -> 0; anything else -> None (dropped, never guessed)."""
    m = re.findall(r"output\s*:\s*\**\s*([01])\b", reply, flags=re.IGNORECASE)
    return int(m[-1]) if m else None

# ----------------------------------------------------------------------------- the steps

class Reply(NamedTuple):
    """A greedy response: the prompt's ids, the response's, and whether it ended at a stop id."""
    prompt_ids: list
    response_ids: list
    finished: bool


def greedy_batch(model, tok, prompts, max_new_tokens, chat=True, *, eos=None, thinking=None):
    """Greedy Replies of one model to many prompts: decode_batch in the LLM-only mode, so the same
    rule as every other path (the raw argmax over the tokenizer's ids until a stop id). Not
    model.generate, which applies the model's generation_config (repetition penalty, ...)."""
    rows = [r2r.encode_prompt(tok, p, chat, thinking=thinking) for p in prompts]
    engine = r2r.EagerEngine(None, model, tok)
    eos = engine.eos if eos is None else eos
    batch = r2r.decode_batch(engine, None, rows, max_new_tokens=max_new_tokens, mode="llm", eos=eos)
    return [Reply(r, t.tokens, bool(t.tokens) and t.tokens[-1] in eos) for r, t in zip(rows, batch.traces)]



class Response(NamedTuple):
    """A response kept for labeling: its prompt's id in the prompts file, the prompt's ids, its own."""
    id: int
    prompt_ids: list
    response_ids: list


class Positions(NamedTuple):
    """Step 2's reading of one response, at each of its n positions: the SLM's argmax (n ints), the
    router's hidden state (n, H) and top-k logits (n, k)."""
    argmax: list
    hidden: torch.Tensor
    topk: torch.Tensor


class Branch(NamedTuple):
    """A mismatch to continue from (step 3): response `seq` of the chunk, cut after `cut` tokens of
    prompt + response, where the SLM would write `token`."""
    seq: int
    cut: int
    token: int


class Judge(NamedTuple):
    """The verifier model of step 4 and its tokenizer."""
    model: torch.nn.Module
    tok: object


def pad_right(seqs, pad, device):
    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs], device=device)  # (B, T)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)
    return ids, mask


@torch.no_grad()
def slm_positions(slm, tok, seqs, starts, k):
    """Step 2, teacher forcing: one batched SLM pass. For each sequence, at every response
    position j (predicting token starts+j), the router features and the SLM's argmax.
    Right padding leaves every real position's causal context untouched. The pass keeps
    hidden states only; lm_head runs over slices of SLICE_LOGITS // V positions, so memory
    does not grow with responses x vocabulary (B x T x V logits: 83 GB at 64 x 4.3K x 152K)."""
    ids, mask = pad_right(seqs, tok.pad_token_id or 0, slm.device)  # padding is masked: any id serves
    hidden = r2r.forward(slm, ids, None, last=True, attention_mask=mask)[0]  # (B, T, H); logits in slices below
    step, out = max(1, SLICE_LOGITS // len(tok)), []
    for i, (s, p) in enumerate(zip(seqs, starts)):
        parts = []
        for a in range(p - 1, len(s) - 1, step):
            h = hidden[i, a:min(a + step, len(s) - 1)]  # (n, H)
            lg = slm.get_output_embeddings()(h)[:, :len(tok)]  # (n, V)
            argmax = lg.argmax(-1)
            parts.append([x.cpu() for x in (argmax,) + r2r.router_inputs(slm, h, lg, argmax, k)[:2]])
        argmax, h, topk = (torch.cat(x) for x in zip(*parts))  # (n,), (n, H), (n, k) for the whole response
        out.append(Positions(argmax.tolist(), h, topk))
    return out


def branch_batches(branches, max_new, budget):
    """Consecutive branches, batched so that batch size x (longest prefix + max_new) stays
    within `budget` tokens: the KV cache a batch holds, whether prefixes are short or long."""
    batch = []
    for br in branches:
        if batch and (len(batch) + 1) * (max(b.cut for b in batch + [br]) + max_new) > budget:
            yield batch
            batch = []
        batch.append(br)
    yield from [batch] if batch else []


@torch.no_grad()
def continue_branches(llm, tok, seqs, branches, stop, max_new, budget):
    """Step 3: for each Branch the LLM continues greedily from seqs[seq][:cut] + [token]. The prefixes are not recomputed: one teacher-forced
    LLM pass over all sequences fills a cache, and each branch takes its first n positions,
    left-padded into a batch (positions keep their true values, padding is masked out).
    `stop(tokens)` says when a branch is finished. Returns the branch tokens, [t, ...]."""
    ids, mask = pad_right(seqs, tok.pad_token_id or 0, llm.device)  # padding is masked: any id serves
    full = DynamicCache()
    llm.base_model(input_ids=ids, attention_mask=mask, cache=full, use_cache=True)
    results = []
    for batch in branch_batches(branches, max_new, budget):
        L = max(b.cut for b in batch)
        cache = DynamicCache()
        for layer, kv in enumerate(full.layers):
            k, v = (torch.cat([torch.nn.functional.pad(x[b.seq:b.seq + 1, :, :b.cut], (0, 0, L - b.cut, 0)) for b in batch])
                    for x in (kv.keys, kv.values))  # (B, heads, L, head_dim), left-padded
            cache.update(k, v, layer)
        mask = torch.tensor([[0] * (L - b.cut) + [1] * b.cut for b in batch], device=llm.device)  # (B, L)
        last = torch.tensor([[b.token] for b in batch], device=llm.device)  # (B, 1)
        pos = torch.tensor([[b.cut] for b in batch], device=llm.device)  # (B, 1)
        outs = [[b.token] for b in batch]
        done = [stop(o) for o in outs]
        for _ in range(max_new):
            if all(done):
                break
            mask = torch.cat([mask, torch.ones_like(last)], dim=1)
            _, logits = r2r.forward(llm, last, cache, attention_mask=mask, position_ids=pos)
            last, pos = logits[:, -1, :len(tok)].argmax(-1, keepdim=True).to(llm.device), pos + 1  # (B, 1)
            for i, t in enumerate(last[:, 0].tolist()):
                if not done[i]:
                    outs[i].append(t)
                    done[i] = stop(outs[i])
        results += list(zip(outs, done))
    return results


def verify_by_answer(tok, response, j, branch):
    """Same final answer from the LLM's own response and from the branch = neutral (0)."""
    ref = extract_answer(tok.decode(response, skip_special_tokens=True))
    alt = extract_answer(tok.decode(response[:j] + branch, skip_special_tokens=True))
    return None if ref is None else int(alt != ref)


def sentence_view(tok, response, j, branch, ends):
    """(context, A, B) for the judge: the text before the sentence that holds position j,
    then that sentence and the next from the LLM's response (A) and from the branch (B),
    with the divergence point marked << >>."""
    start = max([i + 1 for i in range(j) if response[i] in ends], default=0)

    def sentences(tail):
        cut = [i for i, t in enumerate(tail) if t in ends]
        tail = tail[:cut[1] + 1] if len(cut) > 1 else tail
        return tok.decode(response[start:j]) + " <<" + tok.decode(tail[:1]) + ">> " + tok.decode(tail[1:])

    return tok.decode(response[:start]), sentences(response[j:]), sentences(branch)

# ----------------------------------------------------------------------------- one chunk

def peak_memory_gib(device):
    """Peak memory since the last torch.cuda.reset_peak_memory_stats(), summed over the GPUs
    on cuda; elsewhere the process's peak resident memory so far (it never resets)."""
    if device.type == "cuda":
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Steps:
    """A progress bar per step of labeling, the seconds each step took in this run and its
    peak memory (the GPU allocator's, reset between steps; on CPU the process's peak)."""
    NAMES = ("1 LLM responses", "2 SLM features", "3 continuations", "4 verifier")

    def __init__(self, n_prompts, done, device):
        units = ("prompt", "response", "branch", "branch")
        self.bars = [tqdm(desc=name, unit=u, position=i, total=n_prompts if i == 0 else None,
                          initial=done if i == 0 else 0) for i, (name, u) in enumerate(zip(self.NAMES, units))]
        self.seconds, self.peak, self.device = collections.Counter(), collections.Counter(), device

    def done(self, i, n, since):
        """Step i finished n more items; it started at time `since`."""
        self.seconds[self.NAMES[i]] += time.perf_counter() - since
        self.peak[self.NAMES[i]] = max(self.peak[self.NAMES[i]], peak_memory_gib(self.device))
        self.bars[i].set_postfix_str(f"peak {self.peak[self.NAMES[i]]:.2f} GiB", refresh=False)
        self.bars[i].update(n)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def close(self):
        for bar in self.bars:
            bar.close()


def label_chunk(slm, llm, tok, rows, args, judge, eos, ends, steps):
    """All four steps for one chunk of prompts. Returns (rows of the dataset, counters)."""
    stats = collections.Counter()
    t = time.perf_counter()
    # 1. The LLM's greedy responses, as token ids; only finished ones are labeled, as the authors do.
    replies = greedy_batch(llm, tok, [r["prompt"] for r in rows], args.max_new_tokens, not args.no_chat_template,
                           eos=eos)
    keep = [Response(row["id"], r.prompt_ids, r.response_ids) for row, r in zip(rows, replies)
            if r.finished or args.keep_unfinished]
    stats["unfinished responses"] += len(rows) - len(keep)
    steps.done(0, len(rows), t)
    if not keep:
        return [], stats
    t = time.perf_counter()
    # 2. Teacher-forced SLM pass: features and argmax at every response position.
    seqs, starts = [r.prompt_ids + r.response_ids for r in keep], [len(r.prompt_ids) for r in keep]
    slm_out = slm_positions(slm, tok, seqs, starts, args.top_k)
    steps.done(1, len(keep), t)
    t = time.perf_counter()
    # 3. Continue the LLM from every mismatch: to the end (answer check) or two sentences on (judge).
    branches = [Branch(b, starts[b] + j, s) for b, (pos, r) in enumerate(zip(slm_out, keep))
                for j, (s, l) in enumerate(zip(pos.argmax, r.response_ids)) if s != l]
    if judge is None:
        stop, budget = (lambda o: o[-1] in eos), args.max_new_tokens
    else:
        stop, budget = (lambda o: sum(t in ends for t in o) >= 2 or o[-1] in eos), args.judge_span
    cont = continue_branches(llm, tok, seqs, branches, stop, budget, args.branch_tokens)
    steps.done(2, len(branches), t)
    t = time.perf_counter()
    # 4. Verify: neutral (0) or divergent (1); unverifiable mismatches are dropped and counted.
    verdicts = {}
    if judge is None:
        for br, (branch, finished) in zip(branches, cont):
            j, response = br.cut - starts[br.seq], keep[br.seq].response_ids
            verdicts[br.seq, j] = verify_by_answer(tok, response, j, branch) if finished else None
    else:
        views = [sentence_view(tok, keep[br.seq].response_ids, br.cut - starts[br.seq], branch, ends)
                 for br, (branch, _) in zip(branches, cont)]
        prompts, replies, size = [judge_prompt(*v) for v in views], [], args.judge_batch_size
        for a in range(0, len(prompts), size):  # thinking off: a judge that thinks first has no verdict in 16 tokens
            replies += greedy_batch(judge.model, judge.tok, prompts[a:a + size], 16, thinking=False)
        for br, reply in zip(branches, replies):
            verdicts[br.seq, br.cut - starts[br.seq]] = parse_judge(judge.tok.decode(reply.response_ids))
    stats["verifier drops"] += sum(v is None for v in verdicts.values())
    steps.done(3, len(branches), t)
    out = collections.defaultdict(list)
    for b, (r, pos) in enumerate(zip(keep, slm_out)):
        for j, (s, l) in enumerate(zip(pos.argmax, r.response_ids)):
            if s != l and verdicts[b, j] is None:
                continue
            kind = "identical" if s == l else ("neutral", "divergent")[verdicts[b, j]]
            for key, value in (("prompt_id", r.id), ("position", j), ("slm_token", s), ("llm_token", l),
                               ("kind", kind), ("label", int(kind == "divergent")), ("hidden", pos.hidden[j].tolist()),
                               ("topk", pos.topk[j].tolist())):
                out[key].append(value)
    return out, stats

# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = r2r.parser(__doc__, router=False, prompts="train.jsonl")
    p.add_argument("--verifier", default="answer",
                   help="'answer' compares final answers (exact; needs answers), else an instruction-tuned judge model")
    p.add_argument("--limit", type=int, default=None, help="label only this many prompts")
    p.add_argument("--seed", type=int, default=None, help="shuffle the prompts with this seed before --limit")
    # work
    p.add_argument("--out", default="labels", help="output folder; rerun with the same arguments to resume")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest LLM response; longer ones are dropped")
    p.add_argument("--keep-unfinished", action="store_true", help="also label responses cut at --max-new-tokens "
                   "(the authors drop them; demo/rehearse.py keeps them, as random models rarely stop)")
    p.add_argument("--judge-span", type=int, default=64, help="most tokens a branch is continued for the judge")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per chunk (one shard each); the LLM's KV "
                   "cache of a chunk's responses grows with it: reduce if you run out of memory")
    # Defaults for the README's recipe on one 80 GB GPU, beside ~47 GB of bf16 weights (0.6B, 8B, 14B judge).
    p.add_argument("--branch-tokens", type=int, default=65536, help="step 3 continues as many mismatches at once "
                   "as fit this many cached tokens (branches x longest prefix); Qwen3-8B's KV cache takes 0.14 MB "
                   "a token, so the default holds ~9.4 GB (15 branches of 4K tokens)")
    p.add_argument("--judge-batch-size", type=int, default=32, help="judge prompts answered at once (step 4); "
                   "32 prompts of ~600 tokens hold ~3.8 GB of a 14B judge's KV cache")
    p.add_argument("--top-k", type=int, default=100, help="top-k logits stored as router features (paper: 100)")
    args = p.parse_args(argv)
    sizes = (args.max_new_tokens, args.batch_size, args.branch_tokens, args.judge_batch_size, args.judge_span)
    if min(sizes) < 1 or (args.limit or 1) < 1:
        raise r2r.R2RError("--max-new-tokens, --judge-span, --limit and the batch sizes must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = r2r.read_prompts(args.prompts, args.split, args.prompt_field, args.answer_field)
    rows = [dict(r, id=i) for i, r in enumerate(rows)]
    if args.seed is not None:
        random.Random(args.seed).shuffle(rows)
    rows = rows[:args.limit]
    if args.verifier == "answer" and all(r["answer"] is None for r in rows):
        raise r2r.R2RError(f"--verifier answer needs answers, and {args.prompts} has no '{args.answer_field}' "
                           "field: name it with --answer-field or use a judge model")
    device, dtype = r2r.pick_device(args.device, args.dtype)
    slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype, device_map=args.device_map)
    judge = None
    if args.verifier != "answer":
        judge = Judge(r2r.load_model(args.verifier, device, dtype, device_map=args.device_map),
                      r2r.load_tokenizer(args.verifier))
    args.top_k = min(args.top_k, len(tok))
    # Resuming is only safe with every argument that changes a row (all but where and how fast it
    # runs): they are kept beside the shards, with the resolved dtype and the SLM's fingerprint.
    meta = {k: v for k, v in vars(args).items() if k not in ("out", "device", "device_map", "branch_tokens",
                                                            "judge_batch_size", "dtype")}
    meta.update(n=len(rows), dtype=str(dtype), fingerprint=r2r.fingerprint(slm, tok))
    shards = os.path.join(args.out, "shards")
    os.makedirs(shards, exist_ok=True)
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in json.loads(json.dumps(meta)).items() if old.get(k) != v]
        if changed:
            raise r2r.R2RError(f"{args.out} holds labels made with other arguments ({'; '.join(changed)}): rerun "
                               "with the same ones, use another --out or delete it")
    else:
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(meta_path + ".tmp", meta_path)
    eos = r2r.EagerEngine(slm, llm, tok).eos  # decode's stop ids: every greedy path stops alike
    ends = {i for i in range(len(tok)) if SENTENCE_END.search(tok.decode([i]))} | eos
    todo = [(c, os.path.join(shards, f"{c // args.batch_size:05d}")) for c in range(0, len(rows), args.batch_size)]
    todo = [(c, path) for c, path in todo if not os.path.exists(path)]  # skip what an earlier run finished
    steps = Steps(len(rows), len(rows) - sum(len(rows[c:c + args.batch_size]) for c, _ in todo), device)
    for c, path in todo:
        out, stats = label_chunk(slm, llm, tok, rows[c:c + args.batch_size], args, judge, eos, ends, steps)
        ds = datasets.Dataset.from_dict(out or {k: [] for k in FEATURES}, features=FEATURES)
        shutil.rmtree(path + ".tmp", ignore_errors=True)  # left by a run killed mid-write
        ds.save_to_disk(path + ".tmp")
        with open(os.path.join(path + ".tmp", "stats.json"), "w") as f:
            json.dump(stats, f)
        os.replace(path + ".tmp", path)
    steps.close()
    summarize(args.out, tok, steps)


def load_labels(folder):
    """A label.py folder: (its meta.json, every finished shard as one dataset)."""
    import datasets
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise r2r.R2RError(f"no labels in {folder}: make them with label.py or pass --labels")
    with open(path) as f:
        meta = json.load(f)
    shards = sorted(s for s in os.listdir(os.path.join(folder, "shards")) if not s.endswith(".tmp"))
    if not shards:
        raise r2r.R2RError(f"{folder} holds no finished chunk yet: run label.py to the end")
    paths = [os.path.join(folder, "shards", s) for s in shards]
    # A chunk that kept no row (every response unfinished) is a shard without data files.
    parts = [datasets.load_from_disk(p) for p in paths if any(f.endswith(".arrow") for f in os.listdir(p))]
    return meta, datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({})


FEATURES = datasets.Features(dict(
    prompt_id=datasets.Value("int64"), position=datasets.Value("int64"), slm_token=datasets.Value("int64"),
    llm_token=datasets.Value("int64"), kind=datasets.Value("string"), label=datasets.Value("int64"),
    hidden=datasets.Sequence(datasets.Value("float32")), topk=datasets.Sequence(datasets.Value("float32"))))


def summarize(folder, tok, steps):
    ds = load_labels(folder)[1].select_columns(["prompt_id", "slm_token", "llm_token", "kind"])
    stats = collections.Counter()
    for s in sorted(os.listdir(os.path.join(folder, "shards"))):
        with open(os.path.join(folder, "shards", s, "stats.json")) as f:
            stats.update(json.load(f))
    kinds = collections.Counter(ds["kind"])
    n = max(len(ds), 1)
    print(f"{len(ds)} positions from {len(set(ds['prompt_id']))} responses in {folder}")
    for k in ("identical", "neutral", "divergent"):
        print(f"  {k:9s} {kinds[k]:7d}  {kinds[k] / n:6.2%}   (paper: {PAPER_SHARES[k]:.0%})")
    mism = kinds["neutral"] + kinds["divergent"]
    print(f"  mismatches {mism} ({mism / n:.2%} of positions): {kinds['neutral'] / max(mism, 1):.0%} neutral, "
          f"{kinds['divergent'] / max(mism, 1):.0%} divergent")
    pairs = collections.Counter((tok.decode([r["slm_token"]]), tok.decode([r["llm_token"]])) for r in ds
                                if r["kind"] == "neutral")
    print("  commonest neutral (SLM / LLM): " + ", ".join(f"{a!r}/{b!r} {v}" for (a, b), v in pairs.most_common(6)))
    print("  dropped: " + (", ".join(f"{k} {v}" for k, v in sorted(stats.items())) or "nothing"))
    print("  time, peak memory per step (this run): " + ", ".join(f"{k} {v:.0f}s {steps.peak[k]:.2f} GiB"
                                                                for k, v in sorted(steps.seconds.items())))


if __name__ == "__main__":
    r2r.run_main(main)
