"""RoPE whose factors change with the position (issue 28): transformers picks a longrope model's
factors (Phi-3/3.5/4-mini) per forward call by its largest position, so past
original_max_position_embeddings a call switches to the long factors while the cached keys keep
the short ones. r2r caps the pair's positions there (r2r.rope_limit). Here a tiny random Phi-3
pair switches after 32 positions: without the cap decoding and labeling are inexact, with it
every script equals model.generate / a decode and stops at 32 with a note."""

import json

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma3TextConfig,
    LlamaConfig,
    Phi3Config,
    Phi3ForCausalLM,
)

import bench
import evaluate
import fast
import generate
import label
import r2r
import train_router
from demo.build import build_tokenizer

SWITCH, LIMIT = 32, 128  # original_max_position_embeddings, max_position_embeddings
PROMPTS = ["1+2", "4837+2956", "30+4", "12+345"]  # four lengths: batches are left-padded


@pytest.fixture(scope="module")
def tok():
    """The demo tokenizer without EOS (random models write </s> early): decodes run to the end."""
    bare = build_tokenizer()
    bare.eos_token = None
    return bare


def phi3(tok, layers, width, seed):
    """A random Phi-3 with longrope factors far apart (short all 1, long 1..34), no EOS id."""
    torch.manual_seed(seed)
    half = width // 2 // 2  # head_dim / 2 factors, two heads
    config = Phi3Config(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LIMIT,
        original_max_position_embeddings=SWITCH,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * half,
            "long_factor": [1.0 + 3 * i for i in range(half)],
        },
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    return Phi3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def phi(tmp_path_factory, tok):
    """The pair in memory and saved (with the demo tokenizer), and a prompts file with answers."""
    root = tmp_path_factory.mktemp("phi3")
    slm, llm = phi3(tok, 1, 32, seed=1), phi3(tok, 2, 48, seed=2)
    for name, model in (("slm", slm), ("llm", llm)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "p.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "answer": "4"}) + "\n" for p in PROMPTS)
    )
    router = r2r.Router(32, top_k=8, width=8, n_blocks=1, slm=r2r.fingerprint(slm, tok))
    train_router.save_router(router, str(root / "router"))
    return dict(slm=slm, llm=llm, root=root, prompts=str(root / "p.jsonl"))


def oracle(model, tok, ids, n):
    """model.generate, greedy: transformers' Phi-3 recomputes its cache at the switch."""
    out = model.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id
    )
    return out[0, len(ids) :].tolist()


def uncapped(monkeypatch):
    monkeypatch.setattr(r2r, "rope_limit", lambda config: None)


def decode_hidden(slm, ids, response):
    """The SLM's hidden state at each response position, read as decode reads them: the prompt,
    then one token a call, over a DynamicCache."""
    cache, out = DynamicCache(), []
    for fresh in [ids] + [[t] for t in response[:-1]]:
        out.append(r2r.slm_step(slm, torch.tensor([fresh]), cache, 10**9)[0][0])
    return torch.stack(out)  # (n, H)


class StepRouter(torch.nn.Module):
    """Routes exactly the SLM steps numbered in `steps` (counted over the router's calls)."""

    config = {"top_k": 5, "threshold": 0.5}
    threshold = 0.5

    def __init__(self, steps):
        super().__init__()
        self.steps, self.n = steps, 0

    def forward(self, hidden, topk, emb):
        self.n += 1
        return torch.full(hidden.shape[:1], 1e4 if self.n - 1 in self.steps else -1e4)


# ------------------------------------------------------------------------- what transformers does


def test_rope_limit_reads_the_switch_off_the_config():
    phi_config = Phi3Config(
        max_position_embeddings=LIMIT,
        original_max_position_embeddings=SWITCH,
        hidden_size=32,
        num_attention_heads=2,
        rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    )
    assert phi_config.rope_parameters["rope_type"] == "longrope"  # "su" is longrope's old name
    assert r2r.rope_limit(phi_config) == SWITCH
    assert r2r.rope_limit(LlamaConfig(max_position_embeddings=LIMIT)) is None
    dynamic = LlamaConfig(
        max_position_embeddings=LIMIT, rope_parameters={"rope_type": "dynamic", "factor": 2.0}
    )
    assert r2r.rope_limit(dynamic) == LIMIT  # rescales only past max_position_embeddings
    for fixed in (
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": SWITCH},
    ):
        assert (
            r2r.rope_limit(LlamaConfig(max_position_embeddings=LIMIT, rope_parameters=fixed))
            is None
        )
    per_layer_type = Gemma3TextConfig(  # nested: {layer type: its RoPE}
        head_dim=16,
        max_position_embeddings=LIMIT,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": dict(phi_config.rope_parameters, rope_theta=1e6),
        },
    )
    assert r2r.rope_limit(per_layer_type) == SWITCH


def test_factors_switch_per_call_by_its_largest_position(phi, tok):
    """The mechanism: one call over SWITCH tokens reads short factors, over SWITCH + 1 long ones,
    at every position: the second token's state (causal: it sees two) changes with the call."""
    llm = phi["llm"]
    ids = (torch.arange(SWITCH + 1)[None] + 4) % len(tok)  # (1, 33), no <pad>: its row is 0
    second = lambda n: llm.model(ids[:, :n]).last_hidden_state[0, 1]  # noqa: E731
    torch.testing.assert_close(second(2), second(SWITCH), atol=1e-5, rtol=0)
    assert (second(2) - second(SWITCH + 1)).abs().max() > 1e-2


# ----------------------------------------------------------------------------- without the cap


def test_without_the_cap_decoding_is_inexact(phi, tok, monkeypatch):
    """What the cap prevents: past the switch r2r's cached short-factor keys meet long-factor
    queries, while model.generate recomputes; a batch switches short rows early."""
    uncapped(monkeypatch)
    slm, llm = phi["slm"], phi["llm"]
    engine = r2r.EagerEngine(slm, llm, tok)
    assert engine.limits.positions == LIMIT
    ids = r2r.encode_prompt(tok, PROMPTS[1])
    got = r2r.decode(engine, None, ids, max_new_tokens=40, mode="llm", eos=set()).tokens
    want = oracle(llm, tok, ids, 40)
    differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert differ and len(ids) + differ[0] > SWITCH  # equal up to the switch, then not
    rows = [r2r.encode_prompt(tok, p) for p in PROMPTS]
    batch = r2r.decode_batch(engine, None, rows, max_new_tokens=30, mode="llm", eos=set())
    one = [r2r.decode(engine, None, r, max_new_tokens=30, mode="llm", eos=set()) for r in rows]
    assert [t.tokens for t in batch.traces] != [t.tokens for t in one]


def test_without_the_cap_label_features_are_not_decodings(phi, tok, monkeypatch):
    """label.py's teacher-forced pass (step 2) reads a whole response in one call: past the switch
    with the long factors at every position, where decoding read the first 32 with the short."""
    uncapped(monkeypatch)
    llm = phi["llm"]
    replies = label.greedy_batch(llm, tok, PROMPTS, 30, engine=r2r.EagerEngine(llm, llm, tok))
    seqs = [r.prompt_ids + r.response_ids for r in replies]
    assert min(map(len, seqs)) > SWITCH
    starts = [len(r.prompt_ids) for r in replies]
    for r, pos in zip(replies, label.slm_positions(llm, tok, seqs, starts, 5, torch.float32)):
        assert (pos.hidden - decode_hidden(llm, r.prompt_ids, r.response_ids)).abs().max() > 0.1


def test_fast_engine_padding_past_the_cap_would_switch(phi, tok):
    """The fast engine pads a catch-up to a power of two; where the padding passes the cap, it
    must run the exact gap instead (the LLM reads steps 0 and 20: a gap of 20 padded to 32)."""
    slm, llm = phi["slm"], phi["llm"]
    ids = r2r.encode_prompt(tok, PROMPTS[1])
    n = SWITCH - len(ids)
    eager = r2r.decode(
        r2r.EagerEngine(slm, llm, tok), StepRouter({0, 20}), ids, max_new_tokens=n, eos=set()
    )
    engine = fast.FastEngine(slm, llm, tok, max_tokens=SWITCH, graphs=False)
    assert engine.limits.positions == SWITCH
    same = r2r.decode(engine, StepRouter({0, 20}), ids, max_new_tokens=n, eos=set())
    assert same.tokens == eager.tokens and sum(same.from_llm) == 2
    # As before the cap: the padding reaches position 11 + 32 - 1.
    engine.limits = engine.limits._replace(positions=LIMIT)
    other = r2r.decode(engine, StepRouter({0, 20}), ids, max_new_tokens=n, eos=set())
    assert other.tokens != eager.tokens


# ----------------------------------------------------------------------------- with the cap


@pytest.mark.parametrize("batch_size", ["1", "4"])
@pytest.mark.parametrize("mode", ["llm", "slm"])
def test_generate_equals_model_generate_and_stops_at_the_switch(phi, tok, capsys, mode, batch_size):
    argv = ["--slm", str(phi["root"] / "slm"), "--llm", str(phi["root"] / "llm"), "--mode", mode]
    for p in PROMPTS:
        argv += ["--prompt", p]
    generate.main(argv + ["--max-new-tokens", "40", "--batch-size", batch_size, "--json"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    model = phi[mode]
    for p, row in zip(PROMPTS, rows, strict=True):
        ids = r2r.encode_prompt(tok, p)
        assert len(ids) + len(row["token_ids"]) == SWITCH
        assert row["token_ids"] == oracle(model, tok, ids, SWITCH - len(ids))
    assert err.count("switches its RoPE factors after 32 positions; r2r stops there") == 2
    assert err.count(f"note: responses stop at the models' {SWITCH} positions") == 1


def test_generate_refuses_a_prompt_past_the_switch(phi, monkeypatch):
    def no_decoding(*a, **kw):
        raise AssertionError("decoding started")

    monkeypatch.setattr(r2r, "decode", no_decoding)
    monkeypatch.setattr(r2r, "decode_batch", no_decoding)
    argv = ["--slm", str(phi["root"] / "slm"), "--llm", str(phi["root"] / "llm")]
    with pytest.raises(SystemExit) as e:
        r2r.run_main(lambda: generate.main(argv + ["--mode", "slm", "--prompt", "1" * 40]))
    assert "leaves no room in the models' 32 positions" in str(e.value.code)


def test_evaluate_stops_at_the_switch_and_refuses_past_it(phi, tmp_path, capsys):
    argv = ["--slm", str(phi["root"] / "slm"), "--llm", str(phi["root"] / "llm")]
    argv += ["--router", str(phi["root"] / "router"), "--thresholds", "0.5"]
    evaluate.main(argv + ["--prompts", phi["prompts"], "--limit", "1", "--max-new-tokens", "40"])
    err = capsys.readouterr().err
    assert err.count("switches its RoPE factors after 32 positions; r2r stops there") == 2
    assert err.count(f"note: responses stop at the models' {SWITCH} positions") == 1
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1" * 40, "answer": "4"}) + "\n")
    with pytest.raises(SystemExit) as e:
        r2r.run_main(lambda: evaluate.main(argv + ["--prompts", str(long)]))
    assert "leaves no room in the models' 32 positions" in str(e.value.code)


def test_bench_refuses_a_prompt_past_the_switch(phi, tmp_path, monkeypatch):
    def no_decoding(*a, **kw):
        raise AssertionError("decoding started")

    monkeypatch.setattr(r2r, "decode", no_decoding)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1+2"}) + "\n" + json.dumps({"prompt": "1" * 40}) + "\n")
    argv = ["--slm", str(phi["root"] / "slm"), "--llm", str(phi["root"] / "llm")]
    argv += ["--router", str(phi["root"] / "router"), "--prompts", str(long), "--n-prompts", "2"]
    with pytest.raises(SystemExit) as e:
        r2r.run_main(lambda: bench.main(argv))
    assert "leaves no room in the models' 32 positions" in str(e.value.code)


def label_args(phi, out):
    """label.py with the LLM as its own SLM: every position identical, if labeling is exact."""
    llm = str(phi["root"] / "llm")
    return ["--slm", llm, "--llm", llm, "--prompts", phi["prompts"], "--out", out] + [
        "--max-new-tokens",
        "40",
        "--keep-unfinished",
        # The features as computed, to compare with a decode's to 1e-4.
        "--feature-dtype",
        "float32",
    ]


def test_label_stays_within_the_switch_and_its_features_are_a_decodes(phi, tok, tmp_path):
    out = str(tmp_path / "labels")
    label.main(label_args(phi, out))
    _, ds = r2r.load_labels(out)
    for pid, p in enumerate(PROMPTS):
        ids = r2r.encode_prompt(tok, p)
        rows = sorted((r for r in ds if r["prompt_id"] == pid), key=lambda r: r["position"])
        response = [r["llm_token"] for r in rows]
        assert [r["position"] for r in rows] == list(range(SWITCH - len(ids)))  # none dropped
        assert {r["kind"] for r in rows} == {"identical"}
        assert response == oracle(phi["llm"], tok, ids, SWITCH - len(ids))
        want = decode_hidden(phi["llm"], ids, response)  # (n, H)
        torch.testing.assert_close(
            torch.tensor([r["hidden"] for r in rows]), want, atol=1e-4, rtol=0
        )
