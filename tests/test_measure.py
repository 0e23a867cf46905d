"""evaluate.py and bench.py run end to end; their numbers are checked against independent
paths where one exists (never timed assertions)."""

import os

import torch

import bench
import evaluate
import r2r


def test_evaluate_rows_agree_with_batched_generate(demo_pair):
    slm, llm, tok = demo_pair
    results = evaluate.main(["--limit", "6", "--thresholds", "0.5", "--max-new-tokens", "80"])
    table = {r["method"]: r for r in results}
    assert {"SLM only", "LLM only", "R2R (saved)", "R2R", "entropy", "random"} <= set(table)
    rows = r2r.read_prompts(os.path.join(r2r.DEMO, "test.jsonl"), limit=6)
    # oracle: unbatched model.generate
    for name, model in (("SLM only", slm), ("LLM only", llm)):
        correct = 0
        for r in rows:
            ids = r2r.encode_prompt(tok, r["prompt"])
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=80)[
                0, len(ids) :
            ]
            correct += r2r.final_answer(tok.decode(out, skip_special_tokens=True)) == r["answer"]
        assert table[name]["acc"] == correct / 6
        assert table[name]["acc_lo"] <= correct / 6 <= table[name]["acc_hi"]
    assert table["LLM only"]["share"] == 1.0 and table["SLM only"]["share"] == 0.0


def test_bench_demo_prints_its_numbers(capsys):
    bench.main(["--n-prompts", "2", "--max-new-tokens", "5"])  # fewer than the warm-up's 8
    out = capsys.readouterr().out
    for engine in ("eager", "fast"):
        for mode in ("slm", "llm", "r2r"):
            assert f"| {engine} | {mode} |" in out
        assert f"{engine}: predicted R2R at LLM share 13.0%" in out
    # fp32 on the CPU: the engines agree exactly
    for mode in ("slm", "llm", "r2r"):
        assert f"fast vs eager, {mode}: 100.0% identical, first difference at token none" in out


def test_bench_published_pair_path_on_tiny_configs(monkeypatch, capsys):
    tiny = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=151936,
    )
    for name in ("r1-1.5b", "r1-32b"):
        monkeypatch.setitem(bench.CONFIGS, name, dict(bench.CONFIGS[name], **tiny))
    bench.main(
        [
            "--pair",
            "r1-1.5b+32b",
            "--share",
            "0.5",
            "--n-prompts",
            "2",
            "--max-new-tokens",
            "16",
            "--prompt-len",
            "8",
        ]
    )
    out = capsys.readouterr().out
    share = float(out.split("LLM share ")[1].split("%")[0])
    assert 20 < share < 80  # the random router's share, over 32 tokens
    # Each engine starts the random router from the same seed: the same routing, the same tokens.
    assert "fast vs eager, r2r: 100.0% identical, first difference at token none" in out
