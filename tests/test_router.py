"""train_router.py on synthetic labels whose answer is known, and the router's save/load."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model
from test_label import LLM_NEXT, SLM_NEXT, bigram_model

import label
import r2r
import train_router

H = 32


def write_labels(folder, tok, n_prompts=200, positions=20, separable=True, seed=0):
    """A label folder as label.py writes it (its writer, float16 features), for a tiny SLM saved
    beside it. Positives (5%) have hidden[0] shifted by +4: separable, but only for a model that
    reads the hidden state (their top-k logits look like everyone else's)."""
    slm = tiny_model("llama", tok, 1, H)
    slm.save_pretrained(os.path.join(folder, "slm"))
    tok.save_pretrained(os.path.join(folder, "slm"))
    g = torch.Generator().manual_seed(seed)
    n = n_prompts * positions
    y = (
        (torch.rand(n, generator=g) < 0.05).long()
        if separable
        else torch.zeros(n, dtype=torch.long)
    )
    hidden = torch.randn(n, H, generator=g)
    hidden[:, 0] += 4 * y
    prompt_id = torch.arange(n_prompts).repeat_interleave(positions).tolist()
    rows = dict(
        prompt_id=prompt_id,
        prompt_hash=[label.prompt_key(f"prompt {i}") for i in prompt_id],
        position=torch.arange(positions).repeat(n_prompts).tolist(),
        slm_token=torch.randint(0, len(tok), (n,), generator=g).tolist(),
        llm_token=[0] * n,
        kind=["divergent" if v else "identical" for v in y.tolist()],
        label=y.tolist(),
        hidden=[hidden.half()],
        topk=[torch.randn(n, 8, generator=g).sort(descending=True).values.half()],
    )
    os.makedirs(os.path.join(folder, "shards"))
    label.write_shard(os.path.join(folder, "shards", "00000"), rows, {})
    meta = dict(slm=os.path.join(folder, "slm"), fingerprint=r2r.fingerprint(slm, tok))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(dict(meta, format=r2r.LABEL_FORMAT, feature_dtype="float16"), f)
    return slm


def test_separable_positives_reach_recall_at_small_share(tmp_path, tok):
    slm = write_labels(str(tmp_path / "labels"), tok)
    out = str(tmp_path / "router")
    metrics = train_router.main(
        [
            "--labels",
            str(tmp_path / "labels"),
            "--out",
            out,
            "--epochs",
            "15",
            "--width",
            "32",
            "--blocks",
            "1",
            "--batch-size",
            "256",
            "--lr",
            "3e-3",
        ]
    )
    # Measured on held-out prompts that chose neither the weights nor the threshold; planted
    # positives are 5% of positions, so a share near 5% means few false alarms.
    held_out = metrics["test"]
    assert held_out["recall"] >= 0.85 and held_out["share"] <= 0.15, metrics
    # the same share at random finds few
    assert held_out["baselines"]["random"]["recall"] < 0.5
    # Saved and loaded, it gives the same scores, and keeps its threshold.
    router = r2r.load_router(out, slm, tok)
    assert router.threshold == metrics["threshold"] and 0 < router.threshold < 1
    x = (torch.randn(16, H), torch.randn(16, 8), torch.randn(16, H))
    again = r2r.load_router(out, slm, tok)
    assert torch.equal(router(*x), again(*x))
    # Its report beside it: main's figures, the rule, and each split's prompts, all 200 once.
    report = json.load(open(os.path.join(out, "training.json")))
    assert report["test"] == json.loads(json.dumps(held_out)) and report["rule"] == {"recall": 0.95}
    splits = [set(report["prompt_ids"][name]) for name in ("train", "validation", "test")]
    assert sum(map(len, splits)) == len(set.union(*splits)) == 200


def test_save_load_gives_identical_scores(tmp_path, tok):
    slm = tiny_model("llama", tok, 1, H)
    router = r2r.Router(
        H, top_k=8, width=16, n_blocks=2, threshold=0.3, slm=r2r.fingerprint(slm, tok)
    ).eval()
    train_router.save_router(router, str(tmp_path / "r"))
    loaded = r2r.load_router(str(tmp_path / "r"), slm, tok)
    x = (torch.randn(5, H), torch.randn(5, 8), torch.randn(5, H))
    assert torch.equal(router(*x), loaded(*x)) and loaded.threshold == 0.3
    # same shape, other weights: a warning, not an error
    other = tiny_model("llama", tok, 1, H, seed=7)
    r2r.load_router(str(tmp_path / "r"), other, tok)


def test_split_is_by_prompt():
    prompt_ids = torch.arange(50).repeat_interleave(7)[
        torch.randperm(350, generator=torch.Generator().manual_seed(0))
    ]
    split = train_router.split_by_prompt(prompt_ids, 0.2, 0.1, seed=0)
    train, val, test = (set(prompt_ids[i].tolist()) for i in split)
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    assert (len(train), len(val), len(test)) == (35, 10, 5)
    # every position in exactly one split
    assert sorted(torch.cat(list(split)).tolist()) == list(range(350))


def test_threshold_rules():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    labels = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0, 0, 0])
    t = train_router.threshold_for_recall(scores, labels, 0.95)
    assert t == pytest.approx(0.4) and train_router.recall_share(scores, labels, t) == (
        1.0,
        pytest.approx(0.6),
    )
    # 2 of 3 positives
    assert train_router.threshold_for_recall(scores, labels, 0.6) == pytest.approx(0.7)
    assert train_router.threshold_for_share(scores, 0.3) == pytest.approx(0.7)
    assert train_router.auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    # a tie counts half
    assert train_router.auc(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 0])) == 0.75
    big = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    assert train_router.auc(big, (big > 0.5).long()) == pytest.approx(1.0)
    assert train_router.auc(big, torch.randint(0, 2, (20000,))) == pytest.approx(0.5, abs=0.02)


def test_no_positive_labels_is_a_clear_error(tmp_path, tok):
    write_labels(str(tmp_path / "labels"), tok, separable=False)
    with pytest.raises(r2r.R2RError, match="no divergent labels"):
        train_router.main(["--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "router")])
    with pytest.raises(r2r.R2RError, match="no labels"):
        train_router.main(["--labels", str(tmp_path / "nowhere")])


def test_prompts_of_the_same_text_share_a_split(tmp_path, tok, capsys):
    """Every prompt three times, its whitespace changed: label.py and train_router.py say how
    many repeat, and training.json puts each text's three ids in one split."""
    for name, table in (("slm", SLM_NEXT), ("llm", LLM_NEXT)):
        bigram_model(tok, table).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    texts = [f"{i} + {i + 1}" for i in range(10)]
    prompts = texts + [f"  {t} " for t in texts] + [t.replace(" ", "   ") for t in texts]
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps(dict(prompt=p, answer="4")) + "\n" for p in prompts)
    pair = ["--slm", str(tmp_path / "slm"), "--llm", str(tmp_path / "llm")]
    out = ["--out", str(tmp_path / "labels")]
    label.main(pair + ["--prompts", str(tmp_path / "p.jsonl")] + out)
    assert "20 duplicate prompts" in capsys.readouterr().err
    args = ["--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "router")]
    train_router.main(args + ["--epochs", "1", "--val-fraction", "0.2", "--test-fraction", "0.2"])
    assert "20 duplicate prompts" in capsys.readouterr().err
    report = json.load(open(tmp_path / "router" / "training.json"))
    # The oracle: the file's own texts, whitespace normalised.
    split_texts = [
        {" ".join(prompts[i].split()) for i in report["prompt_ids"][name]}
        for name in ("train", "validation", "test")
    ]
    assert [len(s) for s in split_texts] == [6, 2, 2]
    assert sum(map(len, report["prompt_ids"].values())) == 30
    assert len(set.union(*split_texts)) == 10


def test_labels_in_the_old_format_are_refused(tmp_path, tok):
    """A folder from before the format version (no "format" in meta.json): one line, relabel."""
    write_labels(str(tmp_path / "labels"), tok, n_prompts=10)
    meta = json.load(open(tmp_path / "labels" / "meta.json"))
    del meta["format"]
    json.dump(meta, open(tmp_path / "labels" / "meta.json", "w"))
    with pytest.raises(r2r.R2RError, match="format 1, and r2r reads format 2: relabel"):
        train_router.main(["--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "r")])
    with pytest.raises(r2r.R2RError, match="relabel with label.py"):
        label.main(["--limit", "3", "--out", str(tmp_path / "labels")])


def test_the_embedding_table_of_a_bf16_slm_is_its_exact_upcast(tmp_path, tok):
    """train_router.py loads the SLM in its checkpoint's dtype and keeps only its input embedding
    table, in float32: the values of a float32 load, at half its memory (a subprocess's peak)."""
    folder = str(tmp_path / "labels")
    small = write_labels(folder, tok, n_prompts=20)
    # The same embedding table in a SLM of 201M parameters, saved in bf16 (402 MB; 805 MB float32).
    config = dict(small.config.to_dict(), intermediate_size=2**21)
    big = type(small)(type(small.config).from_dict(config))
    big.get_input_embeddings().weight.data.copy_(small.get_input_embeddings().weight)
    big.to(torch.bfloat16).save_pretrained(os.path.join(folder, "slm"))
    fp32_bytes = 4 * r2r.n_params(big)
    del big
    want = r2r.load_model(os.path.join(folder, "slm")).get_input_embeddings().weight
    emb_table = train_router.load_features(folder, "cpu")[1]
    assert emb_table.weight.dtype == torch.float32 and not emb_table.weight.requires_grad
    assert torch.equal(emb_table.weight, want)
    # VmHWM, not ru_maxrss, which survives exec and so would count this pytest process.
    code = (
        "import re, sys, train_router\n"
        "def kib(key):\n"
        "    return int(re.search(key + r':\\s*(\\d+)', open('/proc/self/status').read())[1])\n"
        "before = kib('VmRSS')\n"
        "train_router.load_features(sys.argv[1], 'cpu')\n"
        "print(1024 * (kib('VmHWM') - before))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, folder], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert int(run.stdout) < 0.6 * fp32_bytes, (int(run.stdout), fp32_bytes)
