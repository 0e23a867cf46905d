"""The fast engine's context buckets (fast.FastEngine, min_context): every pass attends over the
smallest bucket that holds the live length. Against the eager engine and a full recompute, on a
short ladder (16, 32, 64, ...) so that tiny decodes cross several buckets; what the engine
allocates; bench.py's context and buffer tables."""

import os

import pytest
import torch
from conftest import PAIRS, ROOT, tiny_model
from test_fast import ScheduleRouter
from test_generate import PROMPT
from transformers import Cache, Qwen3Config, Qwen3ForCausalLM

import bench
import fast
import r2r

# min_context: buckets 16, 32, 64 and the buffer (124 slots for max_tokens 120, catch-ups up to 4)
LADDER = 16
# Routed steps: with an 11-token prompt the LLM's length after step k's catch-up is 11 + k, so
# these land on, just before and just past the boundaries 16, 32 and 64, pad across them (a gap
# of 3 pads to 4), and end on an uncaptured gap of 5.
ROUTED = (0, 2, 4, 5, 6, 10, 14, 18, 21, 22, 26, 30, 34, 38, 42, 46, 50, 53, 54, 59)


def gqa_model(tok, layers, width, seed):
    """A tiny Qwen3 with grouped-query attention (4 heads, 2 KV heads) and a tied lm_head, as the
    real Qwen3s."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=width // 4,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module", params=[*PAIRS, "qwen3-gqa"])
def models(request, tok):
    if request.param == "qwen3-gqa":
        return gqa_model(tok, 1, 32, 1), gqa_model(tok, 2, 48, 2)
    arch, extra = PAIRS[request.param]
    return tiny_model(arch, tok, 1, 32, seed=1), tiny_model(
        arch, tok, 2, 48, extra_vocab=extra, seed=2
    )


def engine(slm, llm, tok, min_context=LADDER):
    return fast.FastEngine(slm, llm, tok, max_tokens=120, max_bucket=4, min_context=min_context)


def same(a, b):
    return (a.tokens, a.from_llm, a.gaps) == (b.tokens, b.from_llm, b.gaps)


@pytest.mark.parametrize("mode", ["r2r", "slm", "llm"])
def test_fast_equals_eager_across_context_buckets(models, tok, mode):
    slm, llm = models
    ids, eng = r2r.encode_prompt(tok, PROMPT), engine(slm, llm, tok)
    kw = dict(max_new_tokens=60, mode=mode, eos=set())
    eager = r2r.decode(r2r.EagerEngine(slm, llm, tok), ScheduleRouter(ROUTED), ids, **kw)
    assert same(r2r.decode(eng, ScheduleRouter(ROUTED), ids, **kw), eager)
    assert eng.contexts == [16, 32, 64, 124]
    # the context buckets its functions attend over
    used = {key[1 if key[0] == "slm" else 2] for key in eng.fns}
    assert len(used) >= 3, "the decode must cross at least three context buckets"


def test_demo_pair_across_context_buckets(demo_pair):
    slm, llm, tok = demo_pair
    router = r2r.load_router(os.path.join(ROOT, "demo", "router"), slm, tok)
    eng = engine(slm, llm, tok)
    for text in ("4837+2956", "99999+1"):
        ids = r2r.encode_prompt(tok, text)
        eager = r2r.decode(
            r2r.EagerEngine(slm, llm, tok), router, ids, max_new_tokens=100, threshold=0.3
        )
        got = r2r.decode(eng, router, ids, max_new_tokens=100, threshold=0.3)
        assert same(got, eager) and 0 < sum(got.from_llm) and got.tokens[-1] == tok.eos_token_id
        assert len({eng.bucket(len(ids) + i) for i in range(1, len(got.tokens))}) >= 3, text


def test_logits_equal_full_recompute_at_every_bucket_boundary(models, tok, monkeypatch):
    """Every SLM step's logits and every catch-up's equal one pass over prompt + the tokens before
    them, without a cache: the catch-ups just before a boundary, those whose padding crosses it,
    and the SLM steps after them."""
    slm, llm = models
    ids, eng, picks = r2r.encode_prompt(tok, PROMPT), engine(slm, llm, tok), []
    sample = r2r.sample
    monkeypatch.setattr(
        r2r,
        "sample",
        lambda logits, t, p, u: (
            picks.append((u is eng.u_llm, logits[0])) or sample(logits, t, p, u)
        ),
    )
    trace = r2r.decode(eng, ScheduleRouter(ROUTED), ids, max_new_tokens=60, eos=set())
    V, n = len(tok), len(ids)
    for model, is_llm, steps in (
        (slm, False, range(60)),
        (llm, True, [i for i, f in enumerate(trace.from_llm) if f]),
    ):
        with torch.no_grad():
            # (T, V): position t predicts t + 1
            full = model(torch.tensor([ids + trace.tokens])).logits[0, :, :V]
        got = [logits for llm_pick, logits in picks if llm_pick == is_llm]
        assert len(got) == len(steps)
        assert max(float((g - full[n - 1 + i]).abs().max()) for g, i in zip(got, steps)) < 1e-4
    # the LLM's live length after each catch-up
    lengths = [n + i for i, f in enumerate(trace.from_llm) if f]
    assert {eng.bucket(m) for m in lengths} >= {16, 32, 64, 124}


def test_prompt_that_starts_in_a_high_bucket(models, tok):
    """A 41-token prompt is read over bucket 64 (no lower bucket is ever built); then a short
    prompt on the same engine builds the low ones and reuses the rest."""
    slm, llm = models
    short = r2r.encode_prompt(tok, PROMPT)
    long = short + short[1:] * 3
    eng, kw = engine(slm, llm, tok), dict(max_new_tokens=40, eos=set())
    for ids in (long, short):
        built = dict(eng.fns)
        eager = r2r.decode(r2r.EagerEngine(slm, llm, tok), ScheduleRouter(ROUTED), ids, **kw)
        assert same(r2r.decode(eng, ScheduleRouter(ROUTED), ids, **kw), eager)
        assert all(eng.fns[key] is fn for key, fn in built.items()), (
            "functions are built once per engine"
        )
        if ids is long:
            assert len(long) == 41 and min(key[1] for key in eng.fns if key[0] == "slm") == 64
    assert min(key[1] for key in eng.fns if key[0] == "slm") == 16


def test_captured_functions_keep_no_autograd_and_no_cache_copies(tok, monkeypatch):
    """Every function the engine builds returns tensors without autograd even with grad on, and its
    attention reads views of the two static caches, as wide as its context bucket: no copies of
    the caches per bucket."""
    slm, llm = gqa_model(tok, 1, 32, 1), gqa_model(tok, 2, 48, 2)
    eng, router = engine(slm, llm, tok), ScheduleRouter(ROUTED)
    r2r.decode(eng, router, r2r.encode_prompt(tok, PROMPT), max_new_tokens=30, eos=set())
    for mode in ("r2r", "slm", "llm"):
        eng.prepare(router, mode=mode)
    # SLM (routed or not) and each catch-up, at each bucket
    assert len(eng.fns) == 2 * 4 + len(eng.buckets) * 4
    layers = eng.slm_cache.layers + eng.llm_cache.layers
    buffers = {
        t.untyped_storage().data_ptr() for layer in layers for t in (layer.keys, layer.values)
    }
    reads = []

    def sdpa(module, query, key, value, *args, **kw):
        reads.append(
            (key.untyped_storage().data_ptr(), value.untyped_storage().data_ptr(), key.shape[2])
        )
        return sdpa_forward(module, query, key, value, *args, **kw)

    sdpa_forward = fast.sdpa_attention_forward
    monkeypatch.setattr(fast, "sdpa_attention_forward", sdpa)
    for key, captured in eng.fns.items():
        lengths = [layer.cumulative_length.clone() for layer in layers]
        eng.gap.fill_(key[1] if key[0] == "llm" else 1)  # a catch-up of P real tokens
        with torch.enable_grad():
            out = captured.fn()
        assert not out.requires_grad and out.grad_fn is None, key
        context = key[1 if key[0] == "slm" else 2]
        assert reads and all(
            k in buffers and v in buffers and width == context for k, v, width in reads
        ), key
        reads.clear()
        for layer, n in zip(layers, lengths):
            layer.cumulative_length.copy_(n)
    assert {
        t.untyped_storage().data_ptr() for layer in layers for t in (layer.keys, layer.values)
    } == buffers
    assert [v for v in vars(eng).values() if isinstance(v, Cache)] == [eng.slm_cache, eng.llm_cache]


def test_cache_bytes_are_what_the_engine_allocates(models, tok, capsys):
    slm, llm = models
    eng = engine(slm, llm, tok)
    # the plan, printed at start
    assert "fast engine: static caches of 124 tokens" in capsys.readouterr().err
    r2r.decode(eng, None, r2r.encode_prompt(tok, PROMPT), max_new_tokens=5, mode="llm", eos=set())
    r2r.decode(eng, None, r2r.encode_prompt(tok, PROMPT), max_new_tokens=5, mode="slm", eos=set())
    for model, cache in ((slm, eng.slm_cache), (llm, eng.llm_cache)):
        assert sum(
            layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
        ) == fast.cache_bytes(model, 124)


def test_one_bucket_is_the_whole_buffer(models, tok):
    """min_context past the buffer: one bucket, every slot read, as before context buckets;
    the same tokens."""
    slm, llm = models
    ids, eng = r2r.encode_prompt(tok, PROMPT), engine(slm, llm, tok, min_context=1000)
    eager = r2r.decode(
        r2r.EagerEngine(slm, llm, tok), ScheduleRouter(ROUTED), ids, max_new_tokens=30, eos=set()
    )
    assert eng.contexts == [124] and same(
        r2r.decode(eng, ScheduleRouter(ROUTED), ids, max_new_tokens=30, eos=set()), eager
    )


TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
)


def tiny_pair(monkeypatch):
    for name in ("qwen3-0.6b", "qwen3-1.7b"):
        monkeypatch.setitem(bench.CONFIGS, name, dict(bench.CONFIGS[name], **TINY))


def test_bench_context_and_buffer_tables(monkeypatch, capsys):
    tiny_pair(monkeypatch)
    bench.main(
        [
            "--pair",
            "qwen3-0.6b+1.7b",
            "--n-prompts",
            "1",
            "--max-new-tokens",
            "6",
            "--prompt-len",
            "8",
            "--repeats",
            "2",
            "--contexts",
            "20",
            "300",
            "--buffers",
            "64",
            "600",
        ]
    )
    out = capsys.readouterr().out
    rows = [
        line.split(" | ")
        for line in out.splitlines()
        if line.startswith(("| eager | ", "| fast | "))
    ]
    steps = [r for r in rows if r[1] in ("20", "300")]
    assert len(steps) == 4 and all(len(r) == 5 and all("(" in x for x in r[2:]) for r in steps)
    assert (
        sum(r[1] == "slope, ms per 1K tokens" for r in rows) == 2
        and "| floor | KV bytes of 1K tokens" in out
    )
    # a 64-token buffer: one bucket of 128 slots
    assert "| 64 | 256 320 |" not in out and "| 64 | 128 |" in out
    assert "| 600 | 256 512 664 |" in out and "buffer 600 over 64: " in out
    assert (
        "fast vs eager, r2r: 100.0% identical, first difference at token none" in out
        and "nan" not in out
    )


def test_bench_fast_only_prints_dashes_not_nan(monkeypatch, capsys):
    tiny_pair(monkeypatch)
    bench.main(
        [
            "--pair",
            "qwen3-0.6b+1.7b",
            "--n-prompts",
            "1",
            "--max-new-tokens",
            "4",
            "--prompt-len",
            "8",
            "--repeats",
            "1",
            "--engines",
            "fast",
        ]
    )
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| fast | r2r |")).split(" | ")
    assert row[6] == "-" and "nan" not in out


def test_buffers_need_contexts_that_fit():
    with pytest.raises(r2r.R2RError, match="--buffers needs --contexts"):
        bench.main(["--buffers", "1024"])
    with pytest.raises(r2r.R2RError, match="--buffers needs --contexts"):
        bench.main(["--contexts", "300", "--buffers", "256"])
