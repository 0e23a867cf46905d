"""Batched mixed decoding (r2r.decode_batch) against independent oracles: each row's own
batch-1 decode, model.generate row by row, a full recompute without a cache, and the
caches' own lengths."""

import argparse
import json
import os

import pytest
import torch
from conftest import ROOT
from test_generate import SignRouter
from tqdm import tqdm
from transformers import DynamicCache, GenerationConfig

import bench
import evaluate
import fast
import generate
import r2r

# Operands of 1 to 4 digits: prompts of different lengths, so the batch is left-padded.
PROMPTS = ["4837+2956", "12+3", "999+1000", "5+67"]


def encode(tok, texts=PROMPTS):
    return [r2r.encode_prompt(tok, t) for t in texts]


def batch1(engine, router, prompts, **kw):
    return [r2r.decode(engine, router, p, **kw) for p in prompts]


def planted_eos(engine, router, prompts, **kw):
    """An EOS id that makes some row end early: a token the second row writes at step 6,
    which the rows reach at different steps (or never)."""
    return {batch1(engine, router, prompts, eos=set(), **kw)[1].tokens[5]}


@pytest.mark.parametrize("mode", ["r2r", "slm", "llm"])
def test_rows_equal_their_batch1_decode(pair, tok, mode):
    slm, llm = pair
    prompts, kw = encode(tok), dict(max_new_tokens=20, mode=mode)
    engine = r2r.EagerEngine(slm, llm, tok)
    eos = planted_eos(engine, SignRouter(), prompts, **kw)
    want = batch1(engine, SignRouter(), prompts, eos=eos, **kw)
    got = r2r.decode_batch(engine, SignRouter(), prompts, eos=eos, **kw)
    lengths = [len(t.tokens) for t in want]
    assert min(lengths) < 20 and len(set(lengths)) > 1, (
        "the test needs rows that end at different steps"
    )
    if mode == "r2r":
        assert 0 < sum(map(sum, (t.from_llm for t in want))) < sum(lengths), (
            "the test needs both models"
        )
    for b, (w, g) in enumerate(zip(want, got.traces)):
        assert (g.tokens, g.from_llm, g.gaps) == (w.tokens, w.from_llm, w.gaps), f"row {b}"
    assert got.steps == max(lengths)
    assert len(got.gaps) == {"slm": 0, "llm": got.steps}.get(mode, len(got.gaps))


def test_sampled_rows_equal_batch1_with_the_same_generators(pair, tok):
    slm, llm = pair
    prompts, kw = encode(tok), dict(max_new_tokens=16, temperature=1.0, top_p=0.9, eos=set())

    def gens(seed):
        return [torch.Generator().manual_seed(seed + b) for b in range(len(prompts))]

    engine = r2r.EagerEngine(slm, llm, tok)
    want = [
        r2r.decode(engine, SignRouter(), p, generator=g, **kw) for p, g in zip(prompts, gens(7))
    ]
    got = r2r.decode_batch(engine, SignRouter(), prompts, generators=gens(7), **kw).traces
    assert [(t.tokens, t.from_llm) for t in got] == [(t.tokens, t.from_llm) for t in want]
    other = r2r.decode_batch(engine, SignRouter(), prompts, generators=gens(8), **kw).traces
    assert [t.tokens for t in other] != [t.tokens for t in got], "sampling ignores the generators"


def test_batched_catch_up_logits_equal_full_recompute(pair, tok):
    _, llm = pair
    prompts = encode(tok)
    gaps = [tok.encode(g, add_special_tokens=False) for g in ("7 + 6", "2 + 3", "9 + 0", "5 + 7")]
    T = max(map(len, prompts))
    # (B, T + gap), left-padded
    ids = torch.tensor([[0] * (T - len(p)) + p + g for p, g in zip(prompts, gaps)])
    mask = torch.tensor(
        [[0] * (T - len(p)) + [1] * (len(p) + len(g)) for p, g in zip(prompts, gaps)]
    )
    pos = mask.cumsum(-1) - 1
    cache = DynamicCache()
    r2r.catch_up(llm, ids[:, :T], cache, attention_mask=mask[:, :T], position_ids=pos[:, :T])
    # (B, V)
    logits = r2r.catch_up(llm, ids[:, T:], cache, attention_mask=mask, position_ids=pos[:, T:])
    for b, (p, g) in enumerate(zip(prompts, gaps)):
        full = llm(torch.tensor([p + g])).logits[0, -1]  # no cache, no padding
        torch.testing.assert_close(logits[b], full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["r2r", "slm", "llm"])
def test_caches_hold_each_rows_committed_tokens(pair, tok, mode):
    slm, llm = pair
    prompts, kw = encode(tok), dict(max_new_tokens=16, mode=mode)
    engine = r2r.EagerEngine(slm, llm, tok)
    eos = planted_eos(engine, SignRouter(), prompts, **kw)
    # the oracle for which rows go on and who wrote
    want = batch1(engine, SignRouter(), prompts, eos=eos, **kw)
    T, steps, llm_len = max(map(len, prompts)), [], [0]

    def check(slm_cache, llm_cache, live):
        n = len(steps) + 1
        # The live rows are those whose batch-1 decode goes on past step n, each with n tokens.
        assert [t.tokens for t in live] == [w.tokens[:n] for w in want if len(w.tokens) > n]
        steps.append(n)
        # every row has ended: the caches hold nothing
        if not live:
            return
        # The SLM has read all but the newest column; the LLM up to its last call, which at
        # step n (if any row of this step was routed) read the T + n - 1 columns before it.
        assert slm_cache.get_seq_length() == (0 if mode == "llm" else T + n - 1)
        if any(len(w.tokens) >= n and w.from_llm[n - 1] for w in want):
            llm_len[0] = T + n - 1
        assert llm_cache.get_seq_length() == llm_len[0]
        for cache in (slm_cache, llm_cache):
            assert all(
                layer.keys.shape[0] == len(live) for layer in cache.layers if layer.keys.numel()
            )

    r2r.decode_batch(engine, SignRouter(), prompts, eos=eos, on_step=check, **kw)
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] > 5


@pytest.mark.parametrize("mode", ["slm", "llm"])
def test_forced_modes_equal_generate_row_by_row(pair, tok, mode):
    slm, llm = pair
    model = slm if mode == "slm" else llm
    prompts = encode(tok)
    # a padded lm_head's rows are no tokens
    extra = list(range(len(tok), model.config.vocab_size)) or None
    config = GenerationConfig(
        do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id, suppress_tokens=extra
    )
    want = [
        model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist()
        for p in prompts
    ]
    eos = {want[2][4]}
    got = r2r.decode_batch(
        r2r.EagerEngine(slm, llm, tok), None, prompts, max_new_tokens=12, mode=mode, eos=eos
    )
    for w, g in zip(want, got.traces):
        end = next((i + 1 for i, t in enumerate(w) if t in eos), len(w))
        assert g.tokens == w[:end]


def test_demo_pair_rows_equal_batch1(demo_pair):
    slm, llm, tok = demo_pair
    router = r2r.load_router(os.path.join(ROOT, "demo", "router"), slm, tok)
    prompts = encode(tok, ["4837+2956", "12+345", "90+9", "1234+5678", "77+808"])
    kw = dict(max_new_tokens=80, threshold=0.3)
    engine = r2r.EagerEngine(slm, llm, tok)
    want = batch1(engine, router, prompts, **kw)
    got = r2r.decode_batch(engine, router, prompts, **kw).traces
    assert (
        all(t.tokens[-1] == tok.eos_token_id for t in want)
        and len({len(t.tokens) for t in want}) > 1
    )
    assert sum(sum(t.from_llm) for t in want) > 0
    for w, g in zip(want, got):
        assert (g.tokens, g.from_llm, g.gaps) == (w.tokens, w.from_llm, w.gaps)


# ------------------------------------------------------------ the scripts


@pytest.mark.parametrize("temperature", ["0", "1.0"])
def test_generate_batch_size_gives_the_batch1_output(capsys, temperature):
    argv = [
        "--mode",
        "r2r",
        "--threshold",
        "0.3",
        "--json",
        "--temperature",
        temperature,
        "--max-new-tokens",
        "40",
    ]
    for p in ("4837+2956", "12+345", "90+9"):
        argv += ["--prompt", p]

    def rows(batch_size):
        generate.main(argv + ["--batch-size", batch_size])
        lines = [
            json.loads(line)
            for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")
        ]
        return [(r["prompt"], r["token_ids"], r["from_llm"]) for r in lines]

    one = rows("1")
    assert len(one) == 3 and one == rows("2") == rows("3")


def test_evaluate_decode_all_is_the_same_at_every_batch_size(demo_pair):
    slm, llm, tok = demo_pair
    router = r2r.load_router(os.path.join(ROOT, "demo", "router"), slm, tok)
    prompts = [
        r2r.encode_prompt(tok, r["prompt"])
        for r in r2r.read_prompts(os.path.join(ROOT, "demo", "test.jsonl"), limit=6)
    ]
    runs = [
        evaluate.decode_all(
            fast.pick_engine(slm, llm, tok, kind=kind, max_tokens=200),
            router,
            prompts,
            argparse.Namespace(batch_size=b, max_new_tokens=60),
            tqdm(disable=True),
            threshold=0.3,
        )
        for kind, b in (("eager", 1), ("eager", 3), ("fast", 1))
    ]
    assert len({tuple((tuple(t.tokens), tuple(t.from_llm)) for t in run) for run in runs}) == 1
    assert len({len(p) for p in prompts}) > 1 and sum(sum(t.from_llm) for t in runs[0]) > 0


def test_bench_batch_table(demo_pair, capsys):
    slm, llm, tok = demo_pair
    bench.main(["--batch-sizes", "1", "2", "--n-prompts", "3", "--max-new-tokens", "20"])
    out = capsys.readouterr().out
    table = [
        line.split("|")[1:-1]
        for line in out.splitlines()
        if line.startswith("| ") and "share" not in line
    ]
    assert [int(row[0]) for row in table] == [1, 2]
    # Oracle for the share: batch-1 decodes of the same 4 prompts (3, rounded up to a
    # multiple of 2).
    router = r2r.load_router(os.path.join(ROOT, "demo", "router"), slm, tok)
    traces = [
        r2r.decode(
            r2r.EagerEngine(slm, llm, tok),
            router,
            r2r.encode_prompt(tok, r["prompt"]),
            max_new_tokens=20,
        )
        for r in r2r.read_prompts(os.path.join(ROOT, "demo", "test.jsonl"), limit=4)
    ]
    share = sum(sum(t.from_llm) for t in traces) / sum(len(t.tokens) for t in traces)
    assert share > 0 and all(row[4].strip() == f"{share:.1%}" for row in table)
    # at B = 1 a step calls the LLM exactly when its token is routed
    assert table[0][5] == table[0][4]
    assert float(table[1][5].strip(" %")) >= float(table[1][4].strip(" %"))


def test_batch_size_must_be_positive():
    with pytest.raises(r2r.R2RError, match="batch-size"):
        generate.parse_args(["--prompt", PROMPTS[0], "--batch-size", "0"])
    with pytest.raises(r2r.R2RError, match="batch-size"):
        evaluate.main(["--batch-size", "0"])
    with pytest.raises(r2r.R2RError, match="batch sizes"):
        bench.main(["--batch-sizes", "2", "0"])
