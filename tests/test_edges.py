"""Edge cases users hit (issue 23), one kind per section, each on tiny models built here: stopping
at the tokenizer's EOS, nothing to label, no pad and no EOS, characters split between the models,
the models' positions, tokenizers that differ beyond the vocabulary, resumes after an edit, the
router's identity in any dtype and without a local path, stdout that a program can read, messages
that point to real flags, checks before any model loads, and honest tables (catch-up, plot, log
file)."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model
from test_label import LLM_NEXT, PLANTED, RESPONSE, SLM_NEXT, bigram_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import evaluate
import generate
import label
import r2r
import train_router
from demo.build import build_tokenizer

PROMPTS = ["1+2", "30+4", "5+6"]  # three lengths: batches are padded


def save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_prompts(path, prompts, answer="4"):
    path.write_text("".join(json.dumps({"prompt": p, "answer": answer}) + "\n" for p in prompts))
    return str(path)


def without_eos(model):
    """The model with no EOS id in its config or generation config (the tokenizer keeps its own)."""
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tok):
    """test_label's exact bigram pair (mismatches at 0 and 7 neutral, at 8 divergent; the LLM
    writes </s> 10th), saved with configs that name no EOS (only the tokenizer knows it), and a
    router for its SLM (any weights)."""
    root = tmp_path_factory.mktemp("planted")
    folders = {
        name: save(without_eos(bigram_model(tok, table)), tok, root / name)
        for name, table in (("slm", SLM_NEXT), ("llm", LLM_NEXT))
    }
    slm = r2r.load_model(folders["slm"])
    router = r2r.Router(
        slm.config.hidden_size, top_k=8, width=8, n_blocks=1, slm=r2r.fingerprint(slm, tok)
    )
    train_router.save_router(router, str(root / "router"))
    return dict(
        folders,
        prompts=write_prompts(root / "prompts.jsonl", PROMPTS),
        root=root,
        router=str(root / "router"),
    )


@pytest.fixture(scope="module")
def planted_labels(planted, tmp_path_factory):
    """label.py's folder for the planted pair, default arguments."""
    out = str(tmp_path_factory.mktemp("labels"))
    label.main(pair_args(planted) + ["--out", out])
    return out


def walk(table, start=":"):
    """The tokens a bigram table writes after `start`, up to </s>: what greedy decoding
    must give."""
    out = [table[start]]
    while out[-1] != "</s>":
        out.append(table[out[-1]])
    return out


def pair_args(p):
    return ["--slm", p["slm"], "--llm", p["llm"], "--prompts", p["prompts"]]


def run_cli(main, argv):
    """main(argv) through r2r.run_main: the one-line message it exits with."""
    with pytest.raises(SystemExit) as e:
        r2r.run_main(lambda: main(argv))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture
def no_models(monkeypatch):
    """Any model or tokenizer load fails the test: the fault must be found before."""

    def loaded(*a, **kw):
        raise AssertionError(f"loaded {a[1:]} before checking the input")

    monkeypatch.setattr(r2r, "from_pretrained", loaded)


def json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


# ------------------------------------------------------------ 1. stopping


def test_stop_set_is_the_tokenizers_eos_and_every_configs(tok):
    slm, llm = (
        without_eos(tiny_model("llama", tok, 1, 32)),
        without_eos(tiny_model("llama", tok, 1, 32)),
    )
    assert r2r.EagerEngine(slm, llm, tok).limits.eos == {tok.eos_token_id}
    llm.generation_config.eos_token_id = [5, 7]
    assert r2r.EagerEngine(slm, llm, tok).limits.eos == {tok.eos_token_id, 5, 7}


def test_decoding_and_labeling_stop_at_the_tokenizers_eos(planted, planted_labels, tok, capsys):
    llm_says, slm_says = walk(LLM_NEXT), walk(SLM_NEXT)
    assert llm_says == RESPONSE and len(slm_says) == 10
    # r2r at threshold 0: all LLM
    for mode, says in (("slm", slm_says), ("llm", llm_says), ("r2r", llm_says)):
        argv = [
            "--slm",
            planted["slm"],
            "--llm",
            planted["llm"],
            "--mode",
            mode,
            "--prompts-file",
            planted["prompts"],
            "--max-new-tokens",
            "40",
            "--batch-size",
            "2",
            "--json",
        ]
        generate.main(
            argv + (["--router", planted["router"], "--threshold", "0"] if mode == "r2r" else [])
        )
        # cut at </s>, not at 40 tokens
        assert [r["token_ids"] for r in json_lines(capsys.readouterr().out)] == [
            tok.convert_tokens_to_ids(says)
        ] * 3, mode
    # label.py keeps only finished responses: all three stopped at </s>, so all are labeled,
    # as planted.
    ds = r2r.load_labels(planted_labels)[1]
    for pid in range(3):
        rows = sorted((r for r in ds if r["prompt_id"] == pid), key=lambda r: r["position"])
        assert [r["kind"] for r in rows] == [PLANTED.get(j, "identical") for j in range(10)]


# ------------------------------------------------------------ 2. nothing to label


def test_nothing_to_label_is_one_error_line(planted, tmp_path):
    message = run_cli(
        label.main, pair_args(planted) + ["--max-new-tokens", "1", "--out", str(tmp_path / "l")]
    )
    assert "no position labeled" in message and "unfinished responses 3" in message
    assert "--keep-unfinished" in message


# ------------------------------------------------------------ 3. no pad and no EOS


def test_no_pad_and_no_eos_labels_and_decodes(tmp_path, capsys):
    bare = build_tokenizer()
    bare.pad_token = bare.eos_token = None
    folders = {
        name: save(bigram_model(bare, table), bare, tmp_path / name)
        for name, table in (("slm", SLM_NEXT), ("llm", LLM_NEXT))
    }
    reloaded = r2r.load_tokenizer(folders["slm"])
    assert reloaded.pad_token_id is None and reloaded.eos_token_id is None
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    argv = ["--slm", folders["slm"], "--llm", folders["llm"]]
    label.main(
        argv
        + [
            "--prompts",
            prompts,
            "--max-new-tokens",
            "10",
            "--keep-unfinished",
            "--out",
            str(tmp_path / "labels"),
        ]
    )
    ds = r2r.load_labels(str(tmp_path / "labels"))[1]
    # Nothing stops, so no branch reaches an answer: every mismatch is dropped; every other
    # position is labeled.
    assert "verifier drops 9" in capsys.readouterr().out
    for pid in range(3):
        rows = sorted((r for r in ds if r["prompt_id"] == pid), key=lambda r: r["position"])
        assert [r["position"] for r in rows] == [j for j in range(10) if j not in PLANTED]
        assert [r["llm_token"] for r in rows] == [
            bare.convert_tokens_to_ids(RESPONSE[j]) for j in range(10) if j not in PLANTED
        ]
        assert {r["kind"] for r in rows} == {"identical"}
    generate.main(
        argv
        + [
            "--mode",
            "llm",
            "--prompts-file",
            prompts,
            "--max-new-tokens",
            "10",
            "--batch-size",
            "3",
            "--json",
        ]
    )
    # runs its full length: no stop id
    assert [r["token_ids"] for r in json_lines(capsys.readouterr().out)] == [
        bare.convert_tokens_to_ids(RESPONSE)
    ] * 3


# ------------------------------------------------------------ 4. characters split between writers


def byte_tokenizer():
    """One token per UTF-8 byte (byte-level BPE without merges): a multi-byte character is several
    tokens."""
    tk = Tokenizer(
        models.BPE(
            vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
            merges=[],
        )
    )
    tk.pre_tokenizer, tk.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def metaspace_tokenizer():
    """SentencePiece-style words ("\u2581the"): its decoder drops the leading space of a decode's
    first word."""
    words = ["<unk>", "</s>", "\u2581the", "\u2581cat", "s", ".", "\u2581sat", ",", "\u2581"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("which", ["demo", "bytes", "metaspace"])
def test_prefixes_equal_a_full_decode(which, tok):
    """generate.Prefixes decodes a growing response from its last whole character; the oracle is
    tok.decode of the whole prefix, at every length, going back now and then."""
    t = {"demo": tok, "bytes": byte_tokenizer(), "metaspace": metaspace_tokenizer()}[which]
    rng = random.Random(0)
    for _ in range(20):
        tokens = (
            [rng.randrange(len(t)) for _ in range(60)]
            if which != "bytes"
            else list(t.encode("".join(rng.choice("ab \u00e9\u4e2d\U0001f600") for _ in range(30))))
        )
        prefix, end = generate.Prefixes(t), 0
        while end < len(tokens):
            end = max(0, end - 3) if rng.random() < 0.1 else end + rng.randint(1, 3)
            assert prefix(tokens, min(end, len(tokens))) == t.decode(
                tokens[:end], skip_special_tokens=True
            )


class Terminal:
    """A stdout that records what is written to it."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def streamed(tok, trace):
    out, grown = Terminal(), r2r.Trace()
    stream = generate.Stream(tok, out)
    for t, w in zip(trace.tokens, trace.from_llm):
        grown.commit(t, bool(w))
        stream(None, None, [grown])
    stream.flush(grown, len(grown.tokens))
    return out.text


@pytest.mark.parametrize("seed", range(20))
def test_split_characters_stay_whole_and_stream_equals_render(seed):
    tok = byte_tokenizer()
    text = "a€b 😀 中文, é ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    g = random.Random(seed)
    writers = (
        [i % 2 for i in range(len(ids))] if seed == 0 else [int(g.random() < 0.4) for _ in ids]
    )
    trace = r2r.Trace(tokens=ids, from_llm=writers)
    plain = generate.render(tok, trace, colour=False)
    assert "\ufffd" not in plain and plain.replace("[[", "").replace("]]", "") == text
    assert streamed(tok, trace) == generate.render(tok, trace, colour=True)


def test_a_response_cut_inside_a_character_shows_the_cut_alike():
    tok = byte_tokenizer()
    ids = tok.encode("ok €")[:-1]  # the last byte of € never came
    trace = r2r.Trace(tokens=ids, from_llm=[0, 0, 0, 1, 1])
    assert generate.render(tok, trace, colour=False) == "ok [[\ufffd]]"
    assert streamed(tok, trace) == generate.render(tok, trace, colour=True)


# ------------------------------------------------------------ 5. the models' positions


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory, tok):
    """A tiny random pair with 256 positions and no EOS: every decode runs until it is stopped."""
    root = tmp_path_factory.mktemp("random")
    return {
        name: save(tiny_model("llama", tok, 1, 32, seed=seed), tok, root / name)
        for name, seed in (("slm", 1), ("llm", 2))
    }


def long_prompt(n_tokens):
    """A prompt of n_tokens tokens through the demo chat template: BOS, a digit a token, ':'."""
    return "1" * (n_tokens - 2)


def test_prompt_past_the_positions_is_refused_before_decoding(
    random_pair, tok, tmp_path, monkeypatch
):
    prompt = long_prompt(304)
    assert len(r2r.encode_prompt(tok, prompt)) == 304

    def no_decoding(*a, **kw):
        raise AssertionError("decoding started")

    monkeypatch.setattr(r2r, "decode", no_decoding)
    monkeypatch.setattr(r2r, "decode_batch", no_decoding)
    argv = ["--slm", random_pair["slm"], "--llm", random_pair["llm"], "--mode", "slm"]
    assert "304 tokens leaves no room in the models' 256 positions" in run_cli(
        generate.main, argv + ["--prompt", prompt]
    )
    prompts = write_prompts(tmp_path / "p.jsonl", ["1+2", prompt])
    monkeypatch.setattr(label, "label_chunk", no_decoding)
    assert "rows 2 leave no room in the models' 256 positions" in run_cli(
        label.main, argv[:4] + ["--prompts", prompts, "--out", str(tmp_path / "l")]
    )
    assert not os.path.exists(tmp_path / "l")
    assert "304 tokens leaves no room" in run_cli(
        evaluate.main, ["--prompts", prompts, "--limit", "2"]
    )


def test_response_stops_at_the_last_position_and_says_so_once(random_pair, tok, capsys):
    prompt = long_prompt(250)
    generate.main(
        [
            "--slm",
            random_pair["slm"],
            "--llm",
            random_pair["llm"],
            "--mode",
            "slm",
            "--prompt",
            prompt,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "20",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert [len(r["token_ids"]) for r in json_lines(out)] == [6, 6]  # 256 - 250
    assert err.count("note: responses stop at the models' 256 positions") == 1
    generate.main(
        [
            "--slm",
            random_pair["slm"],
            "--llm",
            random_pair["llm"],
            "--mode",
            "slm",
            "--prompt",
            "1+2",
            "--max-new-tokens",
            "20",
            "--json",
        ]
    )
    assert "note: responses stop" not in capsys.readouterr().err


def gpt2(tok, seed, n_positions=40):
    """A tiny GPT-2: learned position embeddings, so a position past n_positions raises an
    IndexError."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=n_positions,
            n_embd=16,
            n_layer=1,
            n_head=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=None,
        )
    ).eval()


def test_learned_position_embeddings_stop_instead_of_crashing(tok, tmp_path, capsys):
    model = gpt2(tok, 0)
    engine = r2r.EagerEngine(model, model, tok)
    assert engine.limits.positions == 40
    ids = list(range(4, 14)) * 3 + [4, 5, 6, 7]  # 34 tokens
    trace = r2r.decode(engine, None, ids, max_new_tokens=20, mode="llm", eos=set())
    assert len(trace.tokens) == 6
    batch = r2r.decode_batch(
        engine, None, [ids, ids[:20]], max_new_tokens=30, mode="slm", eos=set()
    )
    assert [len(t.tokens) for t in batch.traces] == [6, 20]
    # label.py: responses and the branches continued from their mismatches all stop at the
    # 40th position.
    bare = build_tokenizer()
    bare.eos_token = None  # nothing stops before the positions end
    argv = [
        f"--{name}={save(gpt2(bare, seed), bare, tmp_path / name)}"
        for name, seed in (("slm", 1), ("llm", 2))
    ]
    label.main(
        argv
        + [
            "--prompts",
            write_prompts(tmp_path / "p.jsonl", PROMPTS),
            "--max-new-tokens",
            "60",
            "--keep-unfinished",
            "--out",
            str(tmp_path / "labels"),
        ]
    )
    drops = int(capsys.readouterr().out.split("verifier drops ")[1].split()[0])
    positions = sum(40 - len(r2r.encode_prompt(bare, p)) for p in PROMPTS)
    assert len(r2r.load_labels(str(tmp_path / "labels"))[1]) + drops == positions and drops > 0


def test_quick_start_default_length_keeps_working_on_the_demo_pair(capsys):
    # --max-new-tokens 256 = the models' positions
    generate.main(["--mode", "slm", "--prompt", "4837+2956"])
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].startswith("-- ") and "note: responses stop" not in err


# ------------------------------------------------------------ 6. tokenizers beyond the vocabulary


class NoModel:
    """Stands for AutoModelForCausalLM where no model may load."""

    @staticmethod
    def from_pretrained(path, **kw):
        raise AssertionError(f"the model {path} loaded before its tokenizer was checked")


def test_a_differing_chat_template_is_refused_and_an_eos_named(tmp_path, monkeypatch, capsys):
    demo = os.path.join(ROOT, "demo", "slm")
    monkeypatch.setattr(r2r, "AutoModelForCausalLM", NoModel)
    for what, key, value in (
        ("chat templates", "chat_template", "{{ messages[0]['content'] }}"),
        ("bos tokens", "bos_token", "<unk>"),
    ):
        other = build_tokenizer()
        setattr(other, key, value)
        other.save_pretrained(tmp_path / key)
        with pytest.raises(r2r.R2RError, match=f"the {what} of {demo} and {tmp_path / key} differ"):
            r2r.load_pair(demo, str(tmp_path / key))
    monkeypatch.undo()
    other = build_tokenizer()
    other.eos_token = "<pad>"
    save(tiny_model("llama", other, 1, 32), other, tmp_path / "eos")
    # the prompt's ids are the same: a warning, not an error
    r2r.load_pair(demo, str(tmp_path / "eos"))
    assert "warning: the eos tokens of" in capsys.readouterr().err


# ------------------------------------------------------------ 7. resume after an edit


def test_an_edited_row_is_relabeled_on_resume(tmp_path, monkeypatch, capsys):
    rows = r2r.read_prompts(os.path.join(r2r.DEMO, "train.jsonl"), limit=5)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    args = ["--prompts", str(path), "--batch-size", "2"]
    label.main(args + ["--out", str(tmp_path / "resumed")])
    real, chunks = label.label_chunk, []
    monkeypatch.setattr(
        label,
        "label_chunk",
        lambda slm, llm, tok, chunk, *a, **kw: (
            chunks.append([r["prompt"] for r in chunk]) or real(slm, llm, tok, chunk, *a, **kw)
        ),
    )
    label.main(args + ["--out", str(tmp_path / "resumed")])
    assert chunks == []  # nothing changed: nothing relabeled
    # row 3 edited
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[4:5] + rows[3:4]))
    capsys.readouterr()
    label.main(args + ["--out", str(tmp_path / "resumed")])
    assert chunks == [[rows[4]["prompt"], rows[3]["prompt"]]]  # only the edited row's chunk
    assert "labeling them again" in capsys.readouterr().err
    label.main(args + ["--out", str(tmp_path / "fresh")])
    fresh, resumed = (r2r.load_labels(str(tmp_path / name))[1] for name in ("fresh", "resumed"))
    assert set(fresh["prompt_id"]) == {0, 1, 2, 3}
    assert (
        resumed.to_dict() == fresh.to_dict()
        and len(os.listdir(tmp_path / "resumed" / "shards")) == 2
    )


# ------------------------------------------------------------ 8.-9. the router's identity


def test_router_matches_its_slm_in_every_dtype(tmp_path, tok, capsys):
    slm = tiny_model("llama", tok, 1, 32)
    with torch.no_grad():
        # values fp16 rounds to zero: a sign test must not flip on them
        slm.model.embed_tokens.weight[0, :4] = torch.tensor([1e-9, -1e-9, 3e-8, -3e-8])
    folder = save(slm, tok, tmp_path / "slm")
    router = r2r.Router(
        32, top_k=8, width=8, n_blocks=1, slm=r2r.fingerprint(r2r.load_model(folder), tok)
    )
    train_router.save_router(router, str(tmp_path / "router"))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        r2r.load_router(str(tmp_path / "router"), r2r.load_model(folder, dtype=dtype), tok)
        assert "warning" not in capsys.readouterr().err, dtype
    other = save(tiny_model("llama", tok, 1, 32, seed=5), tok, tmp_path / "other")
    r2r.load_router(str(tmp_path / "router"), r2r.load_model(other, dtype=torch.bfloat16), tok)
    assert "was trained for slm, not for other" in capsys.readouterr().err


def test_a_trained_router_records_no_local_path(planted, planted_labels, tmp_path):
    train_router.main(
        [
            "--labels",
            planted_labels,
            "--out",
            str(tmp_path / "router"),
            "--epochs",
            "2",
            "--width",
            "8",
            "--blocks",
            "1",
            "--val-fraction",
            "0.34",
            "--test-fraction",
            "0.34",
        ]
    )
    files = {
        name: open(tmp_path / "router" / name, errors="replace").read()
        for name in ("config.json", "README.md")
    }
    for text in files.values():
        assert (
            str(planted["root"]) not in text
            and str(tmp_path) not in text
            and os.path.expanduser("~") not in text
        )
    assert json.loads(files["config.json"])["slm"]["name"] == "slm"
    with open(os.path.join(ROOT, "demo", "router", "config.json")) as f:
        shipped = json.load(f)
    assert shipped["slm"]["name"] == "slm" and "/" not in json.dumps(shipped["slm"])


# ------------------------------------------------------------ 10. output a program can read


def test_json_stdout_is_json_lines_only():
    done = subprocess.run(
        [
            sys.executable,
            "generate.py",
            "--json",
            "--prompt",
            "4837+2956",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == 0, done.stderr
    assert [r["prompt"] for r in json_lines(done.stdout)] == ["4837+2956", "hello"]
    assert (
        "device" in done.stderr and "engine" in done.stderr and "note: the demo pair" in done.stderr
    )


def test_evaluate_stdout_is_the_table_only(tmp_path, capsys):
    evaluate.main(
        [
            "--limit",
            "2",
            "--thresholds",
            "0.5",
            "--max-new-tokens",
            "8",
            "--out",
            str(tmp_path / "r.csv"),
        ]
    )
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line]
    assert lines[0].startswith("2 problems from") and all(
        line.startswith("|") for line in lines[1:]
    )
    assert "wrote" in err and "SLM only     threshold" in err


# ------------------------------------------------------------ 11.-12. messages and early checks


def test_prompt_field_and_split_apply_to_prompts_file(tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    # a blank line is skipped, as in a .txt
    path.write_text('{"q": "4837+2956"}\n\n{"q": "12+345"}\n')
    assert "set --prompt-field" in run_cli(generate.main, ["--prompts-file", str(path)])
    generate.main(
        [
            "--prompts-file",
            str(path),
            "--prompt-field",
            "q",
            "--split",
            "test",
            "--mode",
            "slm",
            "--max-new-tokens",
            "2",
            "--json",
        ]
    )
    assert [r["prompt"] for r in json_lines(capsys.readouterr().out)] == ["4837+2956", "12+345"]


EMPTY_ROW = '{"prompt": "1+2", "answer": "3"}\n{"prompt": "  ", "answer": "3"}\n'
# (script, arguments, what the one line must say); {tmp} is a fresh folder
BAD = [
    (generate, ["--engine", "fast", "--batch-size", "4", "--prompt", "1+2"], "use --batch-size 1"),
    (generate, ["--router", "{tmp}/none", "--prompt", "1+2"], "--router {tmp}/none does not exist"),
    (generate, ["--prompt", " "], "empty prompt"),
    (
        generate,
        ["--prompts-file", "{tmp}/missing.jsonl"],
        "--prompts-file {tmp}/missing.jsonl does not exist",
    ),
    (generate, ["--prompts-file", "missing.jsonl"], "--prompts-file missing.jsonl does not exist"),
    (
        generate,
        ["--temperature", "-1", "--prompt", "1+2"],
        "--temperature must be at least 0, not -1.0",
    ),
    (generate, ["--top-p", "0", "--prompt", "1+2"], "--top-p 0.0 is outside (0, 1]"),
    (generate, ["--max-new-tokens", "0", "--prompt", "1+2"], "--max-new-tokens must be at least 1"),
    (generate, ["--batch-size", "0", "--prompt", "1+2"], "--batch-size must be at least 1"),
    (generate, ["--threshold", "-0.5", "--prompt", "1+2"], "--threshold -0.5 is outside [0, 1]"),
    (
        generate,
        ["--device", "cuda", "--prompt", "1+2"],
        "--device cuda, but torch sees no CUDA GPU",
    ),
    (generate, ["--slm", "./nowhere", "--prompt", "1+2"], "--slm ./nowhere does not exist"),
    (evaluate, ["--engine", "fast"], "use --batch-size 1"),
    (evaluate, ["--limit", "0"], "--limit must be at least 1"),
    (evaluate, ["--thresholds", "2"], "--thresholds 2.0: each must lie in [0, 1]"),
    (evaluate, ["--prompts", "{tmp}/empty_row.jsonl"], "row 2 has no text in a field 'prompt'"),
    (evaluate, ["--prompts", "missing.jsonl"], "--prompts missing.jsonl does not exist"),
    (evaluate, ["--router", "{tmp}/none"], "--router {tmp}/none does not exist"),
    (evaluate, ["--device", "cuda"], "--device cuda, but torch sees no CUDA GPU"),
    (label, ["--prompts", "{tmp}/empty_row.jsonl"], "row 2 has no text in a field 'prompt'"),
    (label, ["--prompts", "missing.jsonl"], "--prompts missing.jsonl does not exist"),
    (label, ["--limit", "0"], "--limit must be at least 1"),
    (label, ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (label, ["--batch-size", "0"], "--batch-size must be at least 1"),
    (label, ["--branch-tokens", "0"], "--branch-tokens must be at least 1"),
    (label, ["--judge-batch-size", "0"], "--judge-batch-size must be at least 1"),
    (label, ["--judge-span", "0"], "--judge-span must be at least 1"),
    (label, ["--top-k", "0"], "--top-k must be at least 1"),
    (label, ["--verifier", "./judge"], "--verifier ./judge does not exist"),
    (label, ["--llm", "{tmp}/none"], "--llm {tmp}/none does not exist"),
    (label, ["--device", "cuda"], "--device cuda, but torch sees no CUDA GPU"),
    (train_router, ["--labels", "{tmp}/none"], "no labels in {tmp}/none"),
    (train_router, ["--epochs", "0"], "--epochs must be at least 1"),
    (train_router, ["--patience", "0"], "--patience must be at least 1"),
    (train_router, ["--batch-size", "0"], "--batch-size must be at least 1"),
    (train_router, ["--width", "0"], "--width must be at least 1"),
    (train_router, ["--lr", "0"], "--lr must be above 0, not 0.0"),
    (train_router, ["--weight-decay", "-1"], "--weight-decay must be at least 0"),
    (train_router, ["--dropout", "1"], "--dropout must be below 1, not 1.0"),
    (train_router, ["--recall", "0"], "--recall must be in (0, 1], not 0.0"),
    (train_router, ["--llm-share", "1.5"], "--llm-share must be in (0, 1], not 1.5"),
    (
        train_router,
        ["--val-fraction", "0.5", "--test-fraction", "0.5"],
        "--test-fraction must be in (0, 0.5)",
    ),
    (train_router, ["--device", "cuda"], "--device cuda, but torch sees no CUDA GPU"),
]


@pytest.mark.parametrize(
    "script, argv, says", BAD, ids=[f"{s.__name__}{' '.join(a)}" for s, a, _ in BAD]
)
def test_bad_input_is_one_line_before_any_model_loads(script, argv, says, tmp_path, no_models):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    (tmp_path / "empty_row.jsonl").write_text(EMPTY_ROW)
    message = run_cli(script.main, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert says.replace("{tmp}", str(tmp_path)) in message, message
    # evaluate and label have no --prompt
    assert "--prompt " not in message + " " or script is generate
    assert (
        "(not a file)" not in message
        and "or pass --" not in message
        and ("--top-p" in says) == ("--top-p" in message)
    )


def test_help_shows_defaults_and_status_names_no_false_reason(capsys):
    for script, default in (
        (generate, "(default: 256)"),
        (evaluate, "(default: 128)"),
        (label, "(default: 65536)"),
        (train_router, "(default: 0.95)"),
    ):
        with pytest.raises(SystemExit):
            script.parse_args(["--help"])
        assert default in " ".join(capsys.readouterr().out.split()), script.__name__
    r2r.pick_device("cpu", "float16")
    assert capsys.readouterr().err == "device cpu, dtype float16\n"


# ------------------------------------------------------------ 13. honest tables


def test_mean_catch_up_counts_only_gaps_after_the_prompt(random_pair, capsys):
    slm, llm, tok = r2r.load_pair(random_pair["slm"], random_pair["llm"])
    trace = r2r.decode(
        r2r.EagerEngine(slm, llm, tok),
        None,
        r2r.encode_prompt(tok, "1+2"),
        max_new_tokens=5,
        mode="llm",
    )
    # the first call read the prompt only
    assert trace.gaps == [0, 1, 1, 1, 1] and trace.mean_catch_up == 1.0
    by_hand = r2r.Trace()
    for token, routed in zip(range(8), [0, 0, 1, 0, 1, 1, 0, 0]):
        by_hand.commit(token, routed)
    # the gaps it read
    assert by_hand.gaps == [2, 2, 1] and by_hand.mean_catch_up == pytest.approx(5 / 3)
    generate.main(
        [
            "--slm",
            random_pair["slm"],
            "--llm",
            random_pair["llm"],
            "--mode",
            "llm",
            "--prompt",
            "1+2",
            "--max-new-tokens",
            "5",
        ]
    )
    assert "5 LLM calls, mean catch-up 1.0 tokens" in capsys.readouterr().out


def test_plot_labels_do_not_overlap_and_the_legend_covers_no_point(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)

    def row(method, threshold, share, acc):
        return dict(
            method=method,
            threshold=threshold,
            share=share,
            acc=acc,
            acc_lo=acc - 0.05,
            acc_hi=acc + 0.05,
            n=100,
        )

    rows = [
        row("SLM only", None, 0, 0.5),
        row("LLM only", None, 1, 0.95),
        row("R2R (saved)", 0.82, 0.08, 0.9),
        row("entropy", 0.4, 0.08, 0.6),
        row("random", 0.4, 0.6, 0.05),
        row("random", 0.5, 0.9, 0.1),
    ]
    rows += [
        row("R2R", t, 0.08 + 0.001 * i, 0.9 + 0.002 * i)
        for i, t in enumerate([0.3, 0.5, 0.7, 0.75, 0.8])
    ]
    evaluate.plot(rows, str(tmp_path / "p.png"))
    (fig,) = figures
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 6
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    legend = ax.get_legend().get_window_extent(renderer)
    points = ax.transData.transform([(100 * r["share"], 100 * r["acc"]) for r in rows])
    assert not any(legend.contains(x, y) for x, y in points)


def test_label_log_has_no_escape_codes(planted, tmp_path, capsys):
    label.main(pair_args(planted) + ["--batch-size", "2", "--out", str(tmp_path / "labels")])
    err = capsys.readouterr().err
    # no cursor movement, as nested progress bars write
    assert "\x1b" not in err
    # whole lines, no carriage return inside
    assert [line.split(":")[0] for line in err.split("\n") if line.startswith("labeled")] == [
        "labeled 2/3 prompts",
        "labeled 3/3 prompts",
    ]


def test_a_larger_limit_grows_a_label_folder(tmp_path, monkeypatch):
    """ "Label more prompts": a rerun with a larger --limit labels only the new chunks, and the
    folder then equals one labeled at that limit from the start."""
    args = ["--batch-size", "2", "--out", str(tmp_path / "grown")]
    label.main(args + ["--limit", "2"])
    # As an older r2r wrote meta.json: with --limit and the rows' count in it.
    meta = json.loads((tmp_path / "grown" / "meta.json").read_text())
    (tmp_path / "grown" / "meta.json").write_text(json.dumps(dict(meta, limit=2, n=2)))
    real, chunks = label.label_chunk, []

    def counted(slm, llm, tok, chunk, *a, **kw):
        chunks.append([r["id"] for r in chunk])
        return real(slm, llm, tok, chunk, *a, **kw)

    monkeypatch.setattr(label, "label_chunk", counted)
    label.main(args + ["--limit", "4"])
    assert chunks == [[2, 3]]
    label.main(["--batch-size", "2", "--limit", "4", "--out", str(tmp_path / "fresh")])
    grown, fresh = (r2r.load_labels(str(tmp_path / name))[1] for name in ("grown", "fresh"))
    assert grown.to_dict() == fresh.to_dict() and set(fresh["prompt_id"]) == {0, 1, 2, 3}
