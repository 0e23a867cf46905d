"""Mixed decoding (generate.py / r2r.decode) against independent oracles: model.generate,
full recomputes without a cache, and the caches' own lengths."""

import json
import os

import pytest
import torch
from conftest import ROOT, tiny_model
from transformers import DynamicCache, LlamaForCausalLM

import generate
import r2r
import train_router

PROMPT = "4837+2956"


class SignRouter(torch.nn.Module):
    """Routes exactly the steps where the SLM's first hidden unit is positive: about half,
    chosen by something the decode loop cannot see coming."""

    config = {"top_k": 5, "threshold": 0.5}
    threshold = 0.5

    def forward(self, hidden, topk, emb):
        return hidden[:, 0] * 1e4


def oracle(model, tok, ids, n):
    """model.generate, greedy, restricted to the tokenizer's ids (a padded lm_head's extra
    rows are not tokens)."""
    vocab = model.config.vocab_size
    out = model.generate(
        torch.tensor([ids]),
        do_sample=False,
        max_new_tokens=n,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=list(range(len(tok), vocab)) or None,
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("mode", ["slm", "llm"])
def test_forced_modes_equal_generate(pair, tok, mode):
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    trace = r2r.decode(
        r2r.EagerEngine(slm, llm, tok), None, ids, max_new_tokens=24, mode=mode, eos=set()
    )
    assert trace.tokens == oracle(slm if mode == "slm" else llm, tok, ids, 24)
    assert trace.from_llm == [int(mode == "llm")] * 24


def test_r2r_tokens_are_their_source_models_argmax(pair, tok):
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    trace = r2r.decode(
        r2r.EagerEngine(slm, llm, tok), SignRouter(), ids, max_new_tokens=24, eos=set()
    )
    assert 0 < sum(trace.from_llm) < 24, "the test needs both models to write"
    for i, (token, src) in enumerate(zip(trace.tokens, trace.from_llm)):
        model = llm if src else slm
        logits = model(torch.tensor([ids + trace.tokens[:i]])).logits[0, -1, : len(tok)]  # no cache
        assert token == int(logits.argmax()), f"token {i} from {'LLM' if src else 'SLM'}"


def test_catch_up_logits_equal_full_recompute(pair, tok):
    _, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    gap = tok.encode("7 + 6 + 0 = 1 3 , write", add_special_tokens=False)
    cache = DynamicCache()
    r2r.catch_up(llm, torch.tensor([ids]), cache)
    logits = r2r.catch_up(llm, torch.tensor([gap]), cache)[0]  # one pass over the whole gap
    full = llm(torch.tensor([ids + gap])).logits[0, -1]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == len(ids) + len(gap)


@pytest.mark.parametrize("mode", ["r2r", "slm", "llm"])
def test_caches_hold_exactly_what_each_model_was_fed(pair, tok, mode):
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)
    steps = []

    def check(slm_cache, llm_cache, traces):
        trace = traces[0]
        n, routed = len(trace.tokens), [i for i, f in enumerate(trace.from_llm) if f]
        # The SLM has read the prompt and all but the newest token (it reads that next step).
        assert slm_cache.get_seq_length() == (0 if mode == "llm" else len(ids) + n - 1)
        # The LLM lags: it has read the prompt and every token before the last one it wrote.
        assert llm_cache.get_seq_length() == (len(ids) + routed[-1] if routed else 0)
        steps.append(n)

    r2r.decode(
        r2r.EagerEngine(slm, llm, tok),
        SignRouter(),
        ids,
        max_new_tokens=16,
        mode=mode,
        eos=set(),
        on_step=check,
    )
    assert steps == list(range(1, 17))


def test_sampling_is_reproducible(pair, tok):
    slm, llm = pair
    ids = r2r.encode_prompt(tok, PROMPT)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return r2r.decode(
            r2r.EagerEngine(slm, llm, tok),
            SignRouter(),
            ids,
            max_new_tokens=20,
            temperature=1.0,
            top_p=0.9,
            generator=g,
            eos=set(),
        )

    a, b = run(3), run(3)
    assert a.tokens == b.tokens and a.from_llm == b.from_llm
    assert any(run(s).tokens != a.tokens for s in (4, 5, 6)), "sampling ignores the seed"


def test_stops_at_eos(tok):
    slm = tiny_model("llama", tok, 1, 32, seed=1)
    ids = r2r.encode_prompt(tok, PROMPT)
    kw = dict(max_new_tokens=5, mode="slm")
    first = r2r.decode(r2r.EagerEngine(slm, slm, tok), None, ids, eos=set(), **kw).tokens
    assert (
        r2r.decode(r2r.EagerEngine(slm, slm, tok), None, ids, eos={first[2]}, **kw).tokens
        == first[:3]
    )


@pytest.mark.parametrize("mode", ["slm", "llm"])
def test_demo_pair_forced_modes_equal_generate(demo_pair, mode):
    slm, llm, tok = demo_pair
    ids = r2r.encode_prompt(tok, PROMPT)
    model = slm if mode == "slm" else llm
    trace = r2r.decode(r2r.EagerEngine(slm, llm, tok), None, ids, max_new_tokens=80, mode=mode)
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=80)[
        0, len(ids) :
    ].tolist()
    assert trace.tokens == out[: len(trace.tokens)] and trace.tokens[-1] == tok.eos_token_id
    if mode == "llm":
        assert r2r.final_answer(tok.decode(trace.tokens, skip_special_tokens=True)) == "7793"


# ------------------------------------------------------------ the CLI


def demo_router(folder, slm, tok, hidden_size=None):
    torch.manual_seed(0)
    router = r2r.Router(
        hidden_size or slm.config.hidden_size,
        top_k=8,
        width=16,
        n_blocks=1,
        threshold=0.5,
        slm=r2r.fingerprint(slm, tok),
    )
    train_router.save_router(router, str(folder))
    return str(folder)


def test_cli_json(demo_pair, tmp_path, capsys):
    slm, _, tok = demo_pair
    router = demo_router(tmp_path / "router", slm, tok)
    generate.main(
        [
            "--router",
            router,
            "--prompt",
            PROMPT,
            "--prompt",
            "12+345",
            "--json",
            "--threshold",
            "0.5",
        ]
    )
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert len(rows) == 2
    for row in rows:
        assert len(row["token_ids"]) == len(row["from_llm"]) and set(row["from_llm"]) <= {0, 1}
        assert row["llm_share"] == pytest.approx(sum(row["from_llm"]) / len(row["from_llm"]))
        assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True)


def test_cli_plain_output_marks_llm_tokens(capsys):
    generate.main(["--mode", "llm", "--prompt", PROMPT, "--max-new-tokens", "4"])
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("[[") and out[-2].endswith("]]")
    assert "LLM share 100.0%" in out[-1]


def run_cli(argv):
    with pytest.raises(SystemExit) as e:
        r2r.run_main(lambda: generate.main(argv))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_cli_bad_input(demo_pair, tmp_path, tok):
    slm, _, _ = demo_pair
    assert "does not exist" in run_cli(["--slm", str(tmp_path / "missing"), "--prompt", PROMPT])
    assert "empty prompt" in run_cli(["--mode", "slm", "--prompt", "  "])
    assert "outside [0, 1]" in run_cli(["--threshold", "1.5", "--prompt", PROMPT])
    assert "at least 1" in run_cli(["--max-new-tokens", "0", "--prompt", PROMPT])
    assert "--router" in run_cli(["--router", str(tmp_path / "nowhere"), "--prompt", PROMPT])
    wrong = demo_router(tmp_path / "wrong", slm, tok, hidden_size=slm.config.hidden_size + 8)
    assert "trained for an SLM with hidden_size" in run_cli(["--router", wrong, "--prompt", PROMPT])
    # An LLM whose tokenizer has one more word than the SLM's.
    other = tok.__class__.from_pretrained(os.path.join(ROOT, "demo", "slm"))
    other.add_tokens(["banana"])
    folder = str(tmp_path / "other_llm")
    LlamaForCausalLM(tiny_model("llama", other, 1, 32).config).save_pretrained(folder)
    other.save_pretrained(folder)
    assert "share one tokenizer" in run_cli(["--llm", folder, "--mode", "slm", "--prompt", PROMPT])


@pytest.mark.parametrize(
    "prompt, noted",
    [
        ("4837+2956", False),
        ("4 8 + 2 9", False),
        ("hello there", True),
        ("12345+67890", True),
        ("99+1", True),
    ],
)
def test_demo_pair_notes_prompts_outside_its_task(capsys, prompt, noted):
    generate.main(["--mode", "slm", "--prompt", prompt, "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert ("note: the demo pair only knows" in err) == noted
    assert out.splitlines()[-1].startswith("-- 3 new tokens")  # the output follows the note


def test_no_demo_note_for_another_pair(tmp_path, tok, capsys):
    for name, seed in (("slm", 1), ("llm", 2)):
        tiny_model("llama", tok, 1, 32, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    generate.main(
        [
            "--slm",
            str(tmp_path / "slm"),
            "--llm",
            str(tmp_path / "llm"),
            "--mode",
            "slm",
            "--prompt",
            "hello there",
            "--max-new-tokens",
            "3",
        ]
    )
    out, err = capsys.readouterr()
    assert "note:" not in err and out.splitlines()[-1].startswith("-- 3 new tokens")
