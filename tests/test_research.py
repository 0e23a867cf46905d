"""What a researcher uses (issue 13): prompts files, streaming, evaluate.py's intervals,
agreement, --out and --plot, and the router as a hub-ready model. Each against an
independent oracle: model.generate, render() of the finished trace, a normal
approximation, the pre-mixin save format."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model
from safetensors.torch import load_file, save_file

import evaluate
import generate
import r2r

PROMPT = "4837+2956"

# ------------------------------------------------------------ prompts files


def test_txt_prompts_file_decodes_each_line(demo_pair, tmp_path, capsys):
    slm, llm, tok = demo_pair
    lines = ["4837+2956", "12+345", "907+88"]
    path = tmp_path / "prompts.txt"
    path.write_text(f"{lines[0]}\n\n{lines[1]}\n   \n{lines[2]}\n")  # blank lines are skipped
    generate.main(
        ["--prompts-file", str(path), "--mode", "llm", "--max-new-tokens", "12", "--json"]
    )
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert [r["prompt"] for r in rows] == lines
    # oracle: the LLM's own model.generate on that line
    for row, line in zip(rows, lines):
        ids = r2r.encode_prompt(tok, line)
        out = llm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[
            0, len(ids) :
        ].tolist()
        assert row["token_ids"] == out


def test_prompt_formats(tmp_path):
    (tmp_path / "a.json").write_text('[{"q": "1+2", "answer": 3}, {"q": "4+5"}]')
    (tmp_path / "b.jsonl").write_text('{"prompt": "1+2"}\n\n{"prompt": "4+5", "answer": "9"}\n')
    assert r2r.read_prompts(str(tmp_path / "a.json"), prompt_field="q") == [
        {"prompt": "1+2", "answer": "3"},
        {"prompt": "4+5", "answer": None},
    ]
    assert r2r.read_prompts(str(tmp_path / "b.jsonl"), limit=1) == [
        {"prompt": "1+2", "answer": None}
    ]
    with pytest.raises(
        r2r.R2RError, match="row 1 has no text in a field 'prompt' .*fields: q, answer"
    ):
        r2r.read_prompts(str(tmp_path / "a.json"))


@pytest.mark.parametrize(
    "content",
    [b'{"prompt": "1+2"}\n{"prompt": "4+5"\n', bytes(range(256)) * 4],
    ids=["broken-jsonl", "binary"],
)
def test_unreadable_prompts_file_is_one_error_line(tmp_path, content):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    done = subprocess.run(
        [sys.executable, "generate.py", "--prompts-file", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert ("line 2 is not JSON" if content[0] == ord("{") else "not a UTF-8 text file") in lines[0]
    assert ".txt (one prompt per line)" in lines[0]  # says which formats work


# ------------------------------------------------------------ streaming


class Terminal(io.StringIO):
    """A stdout that says it is a terminal and records each write."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def isatty(self):
        return True

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_stream_writes_what_render_gives(tok):
    """Random writers over random ids (special tokens included, which decode to nothing):
    the streamed bytes equal render() of the finished trace."""
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = int(torch.randint(1, 40, (1,), generator=g))
        trace = r2r.Trace(
            tokens=torch.randint(0, len(tok), (n,), generator=g).tolist(),
            from_llm=(torch.rand(n, generator=g) < 0.3).long().tolist(),
        )
        out, grown = Terminal(), r2r.Trace()
        stream = generate.Stream(tok, out)
        for t, w in zip(trace.tokens, trace.from_llm):
            grown.tokens.append(t)
            grown.from_llm.append(w)
            stream(None, None, [grown])
        stream.flush(grown, n)
        assert out.getvalue() == generate.render(tok, trace, colour=True)


def test_generate_streams_on_a_terminal(demo_pair, monkeypatch):
    slm, llm, tok = demo_pair
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    generate.main(["--prompt", PROMPT, "--threshold", "0.3"])
    monkeypatch.undo()
    router = r2r.load_router(os.path.join(ROOT, "demo", "router"), slm, tok)
    trace = r2r.decode(
        r2r.EagerEngine(slm, llm, tok),
        router,
        r2r.encode_prompt(tok, PROMPT),
        max_new_tokens=256,
        threshold=0.3,
    )
    assert 0 < sum(trace.from_llm) < len(trace.tokens)
    text = generate.render(tok, trace, colour=True)
    assert "\033[1;31m" in text and terminal.getvalue().startswith(
        f"{text}\n-- {len(trace.tokens)} new tokens"
    )
    response = [
        w
        for w in terminal.writes
        if w.strip() and not w.startswith(("device", "Loading", "--", "\n"))
    ]
    # written piece by piece, not at the end
    assert len(response) > len(trace.tokens) / 2


# ------------------------------------------------------------ evaluate.py


def test_bootstrap_interval_contains_estimate_and_narrows():
    widths = []
    for n in (50, 800):
        correct = [True] * (6 * n // 10) + [False] * (4 * n // 10)
        lo, hi = evaluate.bootstrap_ci(correct)
        assert lo < 0.6 < hi and evaluate.bootstrap_ci(correct) == (lo, hi)  # seeded
        # oracle: the normal approximation, 2 * 1.96 * sqrt(p (1 - p) / n)
        assert hi - lo == pytest.approx(2 * 1.96 * (0.24 / n) ** 0.5, rel=0.15)
        widths.append(hi - lo)
    # 16x the problems: a quarter of the width
    assert widths[1] < widths[0] / 3


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    out, png = str(folder / "rows.json"), str(folder / "pareto.png")
    rows = evaluate.main(
        ["--limit", "3", "--thresholds", "0", "--max-new-tokens", "64", "--out", out, "--plot", png]
    )
    return rows, out, png, folder


def test_agreement_is_complete_when_every_token_goes_to_the_llm(evaluated):
    rows = evaluated[0]
    everything = next(r for r in rows if r["method"] == "R2R" and r["threshold"] == 0)
    assert (
        everything["share"] == 1.0
        and everything["identical"] == 1.0
        and everything["flipped"] == 0.0
    )
    saved = next(r for r in rows if r["method"] == "R2R (saved)")
    assert 0 < saved["share"] < 0.5


def test_agreement_of_the_slm_against_generate(evaluated, demo_pair):
    slm, llm, tok = demo_pair
    identical, flipped = 0, 0
    # oracle: unbatched generate
    for r in r2r.read_prompts(os.path.join(r2r.DEMO, "test.jsonl"), limit=3):
        ids = r2r.encode_prompt(tok, r["prompt"])
        a, b = (
            m.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64)[
                0, len(ids) :
            ].tolist()
            for m in (slm, llm)
        )
        identical += a == b
        flipped += r2r.final_answer(tok.decode(a, skip_special_tokens=True)) != r2r.final_answer(
            tok.decode(b, skip_special_tokens=True)
        )
    row = next(r for r in evaluated[0] if r["method"] == "SLM only")
    assert (row["identical"], row["flipped"]) == (identical / 3, flipped / 3)


def test_out_round_trips(evaluated):
    rows, out, _, folder = evaluated
    with open(out) as f:
        assert json.load(f) == rows
    path = str(folder / "rows.csv")
    evaluate.write_rows(rows, path)
    with open(path) as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows)
    for r, b in zip(rows, back):
        assert b["method"] == r["method"]
        for k in evaluate.FIELDS[1:]:
            assert (b[k] == "") if r[k] is None else float(b[k]) == pytest.approx(r[k], rel=1e-12)


def test_plot_is_an_image_with_every_series(evaluated):
    import matplotlib.image

    rows, _, png, folder = evaluated
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    labels = evaluate.plot(rows, str(folder / "again.png"))
    assert len(labels) == 6 and any("saved threshold" in s for s in labels), labels


def test_plot_without_matplotlib_is_one_line(monkeypatch):
    # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(r2r.R2RError, match="--plot needs matplotlib"):
        evaluate.parse_args(["--plot", "pareto.png"])


# ------------------------------------------------------------ the router on the hub


def test_save_pretrained_from_pretrained_identical_scores(tmp_path, tok):
    slm = tiny_model("llama", tok, 1, 32)
    torch.manual_seed(0)
    router = r2r.Router(
        32, top_k=8, width=16, n_blocks=2, threshold=0.25, slm=r2r.fingerprint(slm, tok)
    ).eval()
    # set after training, as train_router.py does
    router.config["threshold"] = 0.3
    router.save_pretrained(tmp_path / "r")
    assert {"model.safetensors", "config.json"} <= set(os.listdir(tmp_path / "r"))
    assert not [f for f in os.listdir(tmp_path / "r") if f.endswith((".bin", ".pt", ".pkl"))]
    loaded = r2r.Router.from_pretrained(str(tmp_path / "r"))
    x = (torch.randn(5, 32), torch.randn(5, 8), torch.randn(5, 32))
    assert torch.equal(router(*x), loaded(*x)) and loaded.threshold == 0.3 and not loaded.training
    assert torch.equal(r2r.load_router(str(tmp_path / "r"), slm, tok)(*x), router(*x))
    wider = tiny_model("llama", tok, 1, 48)
    with pytest.raises(r2r.R2RError, match="trained for an SLM with hidden_size 32"):
        r2r.load_router(str(tmp_path / "r"), wider, tok)
    with pytest.raises(r2r.R2RError, match="never pickled"):
        r2r.Router._load_as_pickle(loaded, "pytorch_model.bin", "cpu", True)


def test_router_folders_of_the_previous_format_still_load(tmp_path, tok, demo_pair):
    slm = tiny_model("llama", tok, 1, 32)
    router = r2r.Router(
        32, top_k=8, width=16, n_blocks=1, threshold=0.4, slm=r2r.fingerprint(slm, tok)
    ).eval()
    folder = tmp_path / "old"
    # exactly what save_router wrote before the hub mixin
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in router.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    with open(folder / "config.json", "w") as f:
        json.dump(router.config, f, indent=2)
    x = (torch.randn(5, 32), torch.randn(5, 8), torch.randn(5, 32))
    loaded = r2r.load_router(str(folder), slm, tok)
    assert torch.equal(router(*x), loaded(*x)) and loaded.threshold == 0.4
    # demo/router, against a router built by hand from its files (the old loader's way).
    demo_slm, _, demo_tok = demo_pair
    demo = r2r.load_router(os.path.join(ROOT, "demo", "router"), demo_slm, demo_tok)
    with open(os.path.join(ROOT, "demo", "router", "config.json")) as f:
        by_hand = r2r.Router(**json.load(f))
    by_hand.load_state_dict(load_file(os.path.join(ROOT, "demo", "router", "model.safetensors")))
    x = (torch.randn(5, 96), torch.randn(5, 25), torch.randn(5, 96))
    assert torch.equal(demo(*x), by_hand.eval()(*x)) and demo.threshold == by_hand.threshold
