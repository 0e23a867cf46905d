"""label.py against labels planted in advance, an independent continuation, and a
kill-and-resume."""

import json
import os

import pytest
import torch
from conftest import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import label
import r2r

# The LLM's response from ":" (the demo chat template's last prompt token), and its table.
LLM_NEXT = {
    ":": "write",
    "write": "1",
    "1": "+",
    "+": "2",
    "2": "=",
    "=": "3",
    "3": ";",
    ";": "so",
    "so": "4",
    "4": "</s>",
    "put": "1",
    "thus": "4",
    "5": "</s>",
}
# The SLM agrees except at three planted points.
SLM_NEXT = dict(LLM_NEXT, **{":": "put", ";": "thus", "so": "5"})
RESPONSE = ["write", "1", "+", "2", "=", "3", ";", "so", "4", "</s>"]
# put -> "... so 4" and thus -> "... thus 4" keep the answer 4 (neutral); so 5 changes it.
PLANTED = {0: "neutral", 7: "neutral", 8: "divergent"}


def bigram_model(tok, table):
    """An exact bigram model: one Llama layer whose attention and MLP outputs are zero, so
    the next token depends only on the current one, through the hand-set lm_head."""
    V, H = len(tok), len(tok) + len(tok) % 2  # RoPE wants an even head size
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=H,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V, H))  # token c -> unit vector c
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for cur, nxt in table.items():
            model.lm_head.weight[tok.convert_tokens_to_ids(nxt), tok.convert_tokens_to_ids(cur)] = (
                1.0
            )
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("planted")
    for name, table in (("slm", SLM_NEXT), ("llm", LLM_NEXT)):
        bigram_model(tok, table).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    with open(root / "prompts.jsonl", "w") as f:
        for p in ("1+2", "30+4", "5+6"):
            f.write(json.dumps({"prompt": p, "answer": "4"}) + "\n")
    return root


def run(argv):
    label.main(argv)
    return r2r.load_labels(argv[argv.index("--out") + 1])[1]


def test_recovers_planted_labels(planted, tmp_path, tok):
    ds = run(
        [
            "--slm",
            str(planted / "slm"),
            "--llm",
            str(planted / "llm"),
            "--prompts",
            str(planted / "prompts.jsonl"),
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "labels"),
        ]
    )
    assert sorted(set(ds["prompt_id"])) == [0, 1, 2]
    for pid in range(3):
        rows = sorted((r for r in ds if r["prompt_id"] == pid), key=lambda r: r["position"])
        assert [r["position"] for r in rows] == list(range(len(RESPONSE)))
        assert [r["llm_token"] for r in rows] == tok.convert_tokens_to_ids(RESPONSE)
        assert [r["kind"] for r in rows] == [
            PLANTED.get(j, "identical") for j in range(len(RESPONSE))
        ]
        assert [r["label"] for r in rows] == [
            int(PLANTED.get(j) == "divergent") for j in range(len(RESPONSE))
        ]


def test_identical_rows_agree_and_features_have_shapes(planted, tmp_path, tok):
    ds = run(
        [
            "--slm",
            str(planted / "slm"),
            "--llm",
            str(planted / "llm"),
            "--prompts",
            str(planted / "prompts.jsonl"),
            "--out",
            str(tmp_path / "labels"),
        ]
    )
    assert [
        tok.convert_ids_to_tokens(r["llm_token"]) for r in ds if r["prompt_id"] == 0
    ] == RESPONSE
    for r in ds:
        assert (r["kind"] == "identical") == (r["slm_token"] == r["llm_token"])
        assert len(r["hidden"]) == len(tok) + len(tok) % 2 and len(r["topk"]) == len(tok)


def test_judge_garbage_is_dropped_and_counted(planted, tmp_path, tok, capsys):
    judge = tmp_path / "judge"
    tiny_model("llama", tok, 1, 32).save_pretrained(judge)
    tok.save_pretrained(judge)
    ds = run(
        [
            "--slm",
            str(planted / "slm"),
            "--llm",
            str(planted / "llm"),
            "--prompts",
            str(planted / "prompts.jsonl"),
            "--verifier",
            str(judge),
            "--out",
            str(tmp_path / "labels"),
        ]
    )
    assert set(ds["kind"]) == {"identical"}  # every judged mismatch was unparsable
    assert "verifier drops 9" in capsys.readouterr().out


def test_divergent_rows_reproduce_with_model_generate(demo_pair, tmp_path):
    slm, llm, tok = demo_pair
    ds = run(["--limit", "24", "--out", str(tmp_path / "labels")])
    rows = r2r.read_prompts(os.path.join(r2r.DEMO, "train.jsonl"), limit=24)
    checked = {"neutral": 0, "divergent": 0}
    for pid in sorted(set(ds["prompt_id"])):
        mine = sorted((r for r in ds if r["prompt_id"] == pid), key=lambda r: r["position"])
        response = [r["llm_token"] for r in mine]
        assert [r["position"] for r in mine] == list(range(len(response)))
        prompt = r2r.encode_prompt(tok, rows[pid]["prompt"])
        ref = r2r.final_answer(tok.decode(response, skip_special_tokens=True))
        for r in mine:
            if r["kind"] == "identical":
                continue
            ids = torch.tensor([prompt + response[: r["position"]] + [r["slm_token"]]])
            out = ids[0, len(prompt) :].tolist()
            # an SLM that stops here ends the branch
            if r["slm_token"] != tok.eos_token_id:
                out = llm.generate(ids, do_sample=False, max_new_tokens=128)[
                    0, len(prompt) :
                ].tolist()
            alt = r2r.final_answer(tok.decode(out, skip_special_tokens=True))
            assert (alt != ref) == (r["kind"] == "divergent"), (pid, r["position"])
            checked[r["kind"]] += 1
    assert checked["neutral"] > 0 and checked["divergent"] > 0, checked


def test_kill_and_resume_equals_one_run(demo_pair, tmp_path, monkeypatch, capsys):
    args = ["--limit", "12", "--batch-size", "4"]
    whole = run(args + ["--out", str(tmp_path / "whole")])
    real, calls = label.label_chunk, []

    def dies_on_second_chunk(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-run
        return real(*a, **kw)

    monkeypatch.setattr(label, "label_chunk", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(args + ["--out", str(tmp_path / "resumed")])
    # a shard half-written when it died
    os.makedirs(tmp_path / "resumed" / "shards" / "00001.tmp")
    monkeypatch.setattr(label, "label_chunk", real)
    resumed = run(args + ["--out", str(tmp_path / "resumed")])
    assert resumed.to_dict() == whole.to_dict()
    # Once more, with every chunk done: nothing to time, and it says so.
    capsys.readouterr()
    run(args + ["--out", str(tmp_path / "resumed")])
    assert "per step (this run): none, every chunk was done" in capsys.readouterr().out
    with pytest.raises(r2r.R2RError, match="other arguments"):
        run(["--limit", "8", "--out", str(tmp_path / "resumed")])


def test_judge_prompt_and_parser():
    text = label.judge_prompt("x" * 2000 + "7 + 6", "write <<3>> carry 1", "write <<8>> carry 1")
    assert "Sentence A: write <<3>> carry 1" in text and "Sentence B: write <<8>> carry 1" in text
    assert "x" * 1001 not in text and text.rstrip().endswith("Output: 0 or 1")
    assert label.parse_judge("Output: 1") == 1
    assert label.parse_judge("output:0") == 0
    assert label.parse_judge("Reasoning... **Output:** 1") == 1
    for garbage in ("", "I think they are the same", "Output: maybe", "Output: 10"):
        assert label.parse_judge(garbage) is None


def test_bad_input(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "1+2"}) + "\n")
    with pytest.raises(r2r.R2RError, match="no text in a field 'prompt'"):
        label.main(["--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")])
    with pytest.raises(r2r.R2RError, match="needs answers"):
        label.main(
            [
                "--prompts",
                str(tmp_path / "p.jsonl"),
                "--prompt-field",
                "question",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(r2r.R2RError):
        label.main(["--prompts", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o")])
