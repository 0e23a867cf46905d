"""The fast engine (fast.FastEngine) against the eager one (r2r.EagerEngine), the oracle here:
same tokens, same routing, same catch-ups, on CPU in fp32 where it runs the static caches
and padded catch-ups without CUDA graphs. Also against a full recompute and the caches'
own lengths. The CUDA-only parts (graphs, compile) are exercised by bench.py on a GPU."""

import json
import os

import pytest
import torch
from conftest import ROOT
from test_generate import PROMPT, SignRouter, run_cli
from transformers import MistralConfig, MistralForCausalLM

import fast
import generate
import r2r

# small, so catch-ups run through every bucket and past the largest
BUCKET = 4


class ScheduleRouter(torch.nn.Module):
    """Routes exactly the steps in `steps` (counting its calls), whatever the features say:
    routed steps 0, 1, 3, 6, 10, 15, 21 give catch-ups of 1 to 6 tokens after the first."""

    config = {"top_k": 5, "threshold": 0.5}
    threshold = 0.5

    def __init__(self, steps=(0, 1, 3, 6, 10, 15, 21)):
        super().__init__()
        self.steps, self.calls = set(steps), 0

    def forward(self, hidden, topk, emb):
        self.calls += 1
        return torch.full(hidden.shape[:1], 1e4 if self.calls - 1 in self.steps else -1e4)


def engine(slm, llm, tok, max_tokens=120):
    return fast.FastEngine(slm, llm, tok, max_tokens=max_tokens, max_bucket=BUCKET)


def both(slm, llm, make_router, tok, ids, **kw):
    eager = r2r.decode(r2r.EagerEngine(slm, llm, tok), make_router(), ids, **kw)
    return eager, r2r.decode(engine(slm, llm, tok), make_router(), ids, **kw)


@pytest.mark.parametrize("mode", ["r2r", "slm", "llm"])
def test_fast_equals_eager_with_catch_ups_of_every_length(pair, tok, mode):
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    eager, fast = both(slm, llm, ScheduleRouter, tok, ids, max_new_tokens=30, mode=mode, eos=set())
    assert (fast.tokens, fast.from_llm, fast.gaps) == (
        eager.tokens,
        eager.from_llm,
        eager.gaps,
    )
    if mode == "r2r":
        assert set(range(1, BUCKET + 3)) <= set(eager.gaps), (
            "the test needs gaps of 1 to past the largest bucket"
        )


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.95])
def test_fast_equals_eager_at_router_thresholds(pair, tok, threshold):
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    eager, fast = both(
        slm,
        llm,
        lambda: r2r.ConfidenceRouter("top1", 5, threshold),
        tok,
        ids,
        max_new_tokens=40,
        eos=set(),
    )
    assert (fast.tokens, fast.from_llm, fast.gaps) == (
        eager.tokens,
        eager.from_llm,
        eager.gaps,
    )


@pytest.mark.parametrize("mode", ["r2r", "slm", "llm"])
def test_demo_pair_fast_equals_eager(demo_pair, mode):
    slm, llm, tok = demo_pair
    ids = r2r.encode_prompt(tok, "4837+2956")
    router = r2r.load_router(os.path.join(ROOT, "demo", "router"), slm, tok)
    eager, fast = both(
        slm, llm, lambda: router, tok, ids, max_new_tokens=100, mode=mode, threshold=0.3
    )
    assert (fast.tokens, fast.from_llm, fast.gaps) == (
        eager.tokens,
        eager.from_llm,
        eager.gaps,
    )
    assert mode != "r2r" or 0 < sum(fast.from_llm) < len(fast.tokens)
    assert fast.tokens[-1] == tok.eos_token_id and len(fast.tokens) < 100, (
        "the demo pair stops at its EOS"
    )


def test_one_engine_serves_many_prompts(demo_pair):
    slm, llm, tok = demo_pair
    eng = engine(slm, llm, tok)
    # longer then shorter: old slots must not leak
    for text in ["12+3", "4837+2956", "5+67", "12+3"]:
        ids = r2r.encode_prompt(tok, text)
        want = r2r.decode(r2r.EagerEngine(slm, llm, tok), SignRouter(), ids, max_new_tokens=40)
        got = r2r.decode(eng, SignRouter(), ids, max_new_tokens=40)
        assert (got.tokens, got.from_llm) == (want.tokens, want.from_llm), text


def test_eos_and_max_new_tokens_stop_both_engines_alike(pair, tok):
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    full = both(slm, llm, ScheduleRouter, tok, ids, max_new_tokens=30, eos=set())[0].tokens
    eos = {full[12]}
    for n in (5, 30):
        eager, fast = both(slm, llm, ScheduleRouter, tok, ids, max_new_tokens=n, eos=eos)
        assert fast.tokens == eager.tokens and len(fast.tokens) == min(n, full.index(full[12]) + 1)


def test_sampling_equals_eager_for_the_same_seed(pair, tok):
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    kw = dict(max_new_tokens=30, eos=set(), temperature=1.0, top_p=0.9)
    eager = r2r.decode(
        r2r.EagerEngine(slm, llm, tok),
        ScheduleRouter(),
        ids,
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    eng = engine(slm, llm, tok)
    first, again, other = [
        r2r.decode(
            eng, ScheduleRouter(), ids, generator=torch.Generator().manual_seed(s), **kw
        ).tokens
        for s in (3, 3, 4)
    ]
    assert first == again == eager.tokens and other != first


def test_padded_catch_up_logits_equal_full_recompute(pair, tok, monkeypatch):
    """Each catch-up's logits (padded to its bucket, or past it) equal one pass over prompt +
    every token committed before it, without a cache; and so do the logits of the next token
    fed to the cache it leaves behind, whose junk padding must be invisible."""
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    eng, sampled, errors = engine(slm, llm, tok), [], []
    sample = r2r.sample
    monkeypatch.setattr(
        r2r, "sample", lambda logits, *a: sampled.append(logits) or sample(logits, *a)
    )

    def recompute(tokens):
        return llm(torch.tensor([ids + tokens])).logits[0, -1, : len(tok)]

    def check(slm_cache, llm_cache, traces):
        trace = traces[0]
        if trace.from_llm[-1] and len(trace.tokens) > 1:
            errors.append(float((sampled[-1][0] - recompute(trace.tokens[:-1])).abs().max()))
            n = llm_cache.get_seq_length().clone()
            after = r2r.forward(llm, torch.tensor([trace.tokens[-1:]]), llm_cache, last=True)[1][
                0, -1, : len(tok)
            ]
            errors.append(float((after - recompute(trace.tokens)).abs().max()))
            for layer in llm_cache.layers:
                layer.cumulative_length.copy_(n)

    trace = r2r.decode(eng, ScheduleRouter(), ids, max_new_tokens=30, eos=set(), on_step=check)
    assert set(range(1, BUCKET + 3)) <= set(trace.gaps)
    assert len(errors) >= 12 and max(errors) < 1e-4


@pytest.mark.parametrize("mode", ["r2r", "slm", "llm"])
def test_caches_hold_exactly_what_each_model_was_fed(pair, tok, mode):
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    lengths = []

    def check(slm_cache, llm_cache, traces):
        trace = traces[0]
        n, routed = len(trace.tokens), [i for i, f in enumerate(trace.from_llm) if f]
        want_slm = 0 if mode == "llm" else len(ids) + n - 1
        # all before its last token, when the LLM last wrote
        want_llm = len(ids) + routed[-1] if routed else 0
        lengths.append(
            (int(slm_cache.get_seq_length()), int(llm_cache.get_seq_length()), want_slm, want_llm)
        )

    r2r.decode(
        engine(slm, llm, tok),
        ScheduleRouter(),
        ids,
        max_new_tokens=30,
        mode=mode,
        eos=set(),
        on_step=check,
    )
    assert [(a, b) for a, b, _, _ in lengths] == [(c, d) for _, _, c, d in lengths]
    assert len(lengths) == 30


def test_too_long_for_the_buffers_is_one_line(pair, tok):
    slm, llm = pair
    with pytest.raises(r2r.R2RError, match="exceed the fast engine"):
        r2r.decode(
            engine(slm, llm, tok, max_tokens=20),
            None,
            list(range(15)),
            max_new_tokens=10,
            mode="slm",
        )


def json_rows(argv, capsys):
    """generate.py --json: every stdout line is a JSON object; status lines go to stderr."""
    generate.main(argv + ["--json"])
    out, err = capsys.readouterr()
    return [json.loads(line) for line in out.splitlines()], err


@pytest.mark.parametrize(
    "sampling", [[], ["--temperature", "1.0", "--top-p", "0.9", "--seed", "5"]]
)
def test_generate_cli_engines_agree(capsys, sampling):
    argv = [
        "--prompt",
        "4837+2956",
        "--prompt",
        "12+345",
        "--threshold",
        "0.3",
        "--max-new-tokens",
        "40",
        *sampling,
    ]
    eager, err_eager = json_rows(argv + ["--engine", "eager"], capsys)
    quick, err_fast = json_rows(argv + ["--engine", "fast"], capsys)
    assert "engine eager" in err_eager and "engine fast" in err_fast and len(quick) == 2
    assert [(r["token_ids"], r["from_llm"]) for r in quick] == [
        (r["token_ids"], r["from_llm"]) for r in eager
    ]


def test_fast_engine_refuses_batches_in_one_line():
    assert "one prompt at a time" in run_cli(
        ["--engine", "fast", "--batch-size", "2", "--prompt", "12+3"]
    )


def test_router_loads_onto_the_device_asked(demo_pair):
    """The hub mixin's map_location places the weights it reads, not the module: load_router
    must move the router itself (on a GPU it stayed on the CPU beside CUDA features)."""
    slm, _, tok = demo_pair
    router = r2r.load_router(os.path.join(ROOT, "demo", "router"), slm, tok, "meta")
    assert {p.device.type for p in router.parameters()} == {"meta"}


def test_warm_up_leaves_no_trace_at_the_end_of_full_buffers(pair, tok):
    """What CUDA capture runs first (FastEngine._warm_up): a function called three times, each
    call undone. With the caches at the end of their buffers, the largest catch-up bucket must
    still fit every time, and the random baseline's draws must not move (routing would leave
    eager's). Then the engine still decodes as eager does, random router included."""
    slm, llm = pair
    ids, n = r2r.encode_prompt(tok, PROMPT), 24

    def router():
        return r2r.ConfidenceRouter("random", 5, 0.4, torch.Generator().manual_seed(0))

    eng = engine(slm, llm, tok, max_tokens=len(ids) + n)
    r2r.decode(eng, router(), ids, max_new_tokens=n, eos=set())
    layers = eng.slm_cache.layers + eng.llm_cache.layers
    lengths = [int(layer.cumulative_length) for layer in layers]
    assert lengths[0] == len(ids) + n - 1 and lengths[-1] >= len(ids) + n - 3, (
        "the test needs full buffers"
    )
    state = eng.router.generator.get_state()
    for P in eng.buckets:
        eng._warm_up(eng._llm_fn(P, eng.contexts[-1], 0.0, 1.0))
    eng._warm_up(eng._slm_fn(eng.contexts[-1], True, 0.0, 1.0))
    assert [int(layer.cumulative_length) for layer in layers] == lengths
    assert torch.equal(eng.router.generator.get_state(), state)
    eager = r2r.decode(r2r.EagerEngine(slm, llm, tok), router(), ids, max_new_tokens=n, eos=set())
    got = r2r.decode(eng, router(), ids, max_new_tokens=n, eos=set())
    assert (got.tokens, got.from_llm, got.gaps) == (
        eager.tokens,
        eager.from_llm,
        eager.gaps,
    )
    assert 0 < sum(got.from_llm) < n


def test_max_bucket_that_is_not_a_power_of_two(pair, tok):
    """max_bucket 6: buckets 1, 2, 4; the gaps of 5 and 6 run uncaptured."""
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    eng = fast.FastEngine(slm, llm, tok, max_tokens=120, max_bucket=6)
    eager = r2r.decode(
        r2r.EagerEngine(slm, llm, tok), ScheduleRouter(), ids, max_new_tokens=30, eos=set()
    )
    got = r2r.decode(eng, ScheduleRouter(), ids, max_new_tokens=30, eos=set())
    assert eng.buckets == [1, 2, 4] and {5, 6} <= set(got.gaps)
    assert (got.tokens, got.from_llm, got.gaps) == (
        eager.tokens,
        eager.from_llm,
        eager.gaps,
    )


def test_sliding_window_models_are_refused_in_one_line(tok, monkeypatch, capsys):
    """Their static cache layers also count in Python ints that the engine cannot reset."""
    config = MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        sliding_window=8,
    )
    model = MistralForCausalLM(config).eval()
    with pytest.raises(r2r.R2RError, match="sliding-window layers"):
        fast.FastEngine(model, model, tok, max_tokens=50)
    # By default such a pair decodes eager, saying why.
    eng = fast.pick_engine(model, model, tok, kind=None, max_tokens=50)
    assert type(eng) is r2r.EagerEngine and "sliding-window" in capsys.readouterr().err


def test_prepare_builds_every_function_without_autograd(pair, tok, monkeypatch):
    """bench.py calls prepare() outside any no_grad block; what it captures and compiles must
    still be inference (a graph captured with autograd on records it, and keeps what it saves)."""
    slm, llm = pair
    eng = engine(slm, llm, tok)
    r2r.decode(eng, ScheduleRouter(), r2r.encode_prompt(tok, PROMPT), max_new_tokens=4, eos=set())
    grad_modes = []
    monkeypatch.setattr(
        eng, "_capture", lambda fn, compiled: grad_modes.append(torch.is_grad_enabled()) or fn
    )
    eng.fns.clear()
    eng.prepare(ScheduleRouter(), mode="r2r")
    assert len(grad_modes) == 1 + len(eng.buckets) and not any(grad_modes)
