"""Faults users hit (issue 29), one kind per section: Ctrl-C, flags that are not finite, NaN or inf
in a model's logits or the router's scores, files that are missing, damaged or old, outputs that
cannot be written, leftovers of atomic writes, the router written whole, warnings that say what
differs, and run-time notes. Each fault must end in one `error:` line and no traceback; the
subprocess tests run the scripts on the demo pair as a user does."""

import errno
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_model

# no_models is a fixture: tests ask for it with usefixtures.
from test_edges import no_models, run_cli, save  # noqa: F401
from test_label import LLM_NEXT, SLM_NEXT, bigram_model
from transformers import Gemma2Config, Gemma2ForCausalLM

import bench
import evaluate
import generate
import label
import r2r
import train_router

DEMO = os.path.join(ROOT, "demo")


def cli(main, argv, capsys):
    """main(argv) through r2r.run_main, as `python script.py` runs it -> (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        r2r.run_main(lambda: main(argv))
        raise SystemExit(0)
    code = e.value.code
    err = capsys.readouterr().err
    # Python prints a string code on stderr and exits with status 1.
    if isinstance(code, str):
        return 1, err + code + "\n"
    return code or 0, err


def one_error(err):
    """The one `error:` line of a run's stderr, which holds no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def script(name, *argv, **kw):
    """`python name argv` in the repository, offline, as a user starts it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, name, *argv], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, **kw
    )


# ------------------------------------------------------------ 1. Ctrl-C


def shards_done(folder):
    shards = os.path.join(folder, "shards")
    return sorted(s for s in os.listdir(shards) if not s.endswith(".tmp"))


def test_ctrl_c_keeps_finished_shards_and_a_rerun_resumes(tmp_path):
    out = str(tmp_path / "labels")
    argv = ("--limit", "8", "--batch-size", "2", "--out", out)
    proc = script("label.py", *argv, stdout=subprocess.DEVNULL)
    while not (os.path.isdir(os.path.join(out, "shards")) and shards_done(out)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    kept = shards_done(out)
    assert 0 < len(kept) < 4, "the test needs a run stopped midway"
    assert len(os.listdir(os.path.join(out, "shards"))) == len(kept), "a .tmp was left behind"
    written = {s: os.stat(os.path.join(out, "shards", s)).st_mtime_ns for s in kept}
    rerun = script("label.py", *argv, stdout=subprocess.PIPE)
    err = rerun.communicate(timeout=600)[1]
    assert rerun.returncode == 0, err[-2000:]
    # The rerun labels only the chunks the first run had not finished.
    assert len(shards_done(out)) == 4 and err.count("labeled ") == 4 - len(kept)
    assert {s: os.stat(os.path.join(out, "shards", s)).st_mtime_ns for s in kept} == written


def test_ctrl_c_while_streaming_resets_the_colour(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("4837+2956\n" * 200)
    parent, child = pty.openpty()
    proc = script("generate.py", "--prompts-file", str(prompts), stdout=child)
    os.close(child)
    out = b""
    # A terminal: the response streams, the LLM's tokens in colour; stop after the first summary.
    while b"-- " not in out:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if select.select([parent], [], [], 1)[0]:
            out += os.read(parent, 4096)
    proc.send_signal(signal.SIGINT)
    while True:
        try:
            chunk = os.read(parent, 4096)
        # The terminal closes with the process.
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    err = proc.communicate(timeout=60)[1]
    os.close(parent)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    text = out.decode()
    assert generate.COLOUR[0] in text and text.endswith(generate.COLOUR[1])
    # The printed response is kept.
    assert "so 7 7 9 " in text


def test_stdout_closed_by_its_reader_exits_quietly():
    proc = script("generate.py", "--prompt", "4837+2956", "--json", stdout=subprocess.PIPE)
    # Like `| head -c 0`: the reader leaves before the first line.
    proc.stdout.close()
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 141 and "Traceback" not in err and "Exception" not in err, err


# ------------------------------------------------------------ 2. flags that are not finite

NOT_FINITE = [
    (
        generate,
        ["--prompt", "1+2", "--temperature", "nan"],
        "--temperature must be finite, not nan",
    ),
    (generate, ["--prompt", "1+2", "--top-p", "inf"], "--top-p must be finite, not inf"),
    (generate, ["--prompt", "1+2", "--threshold", "nan"], "--threshold must be finite, not nan"),
    (evaluate, ["--thresholds", "0.5", "nan"], "--thresholds must be finite, not 0.5 nan"),
    (train_router, ["--lr", "inf"], "--lr must be finite, not inf"),
    (train_router, ["--recall", "nan"], "--recall must be finite, not nan"),
    (bench, ["--share", "nan"], "--share must be finite, not nan"),
]


@pytest.mark.usefixtures("no_models")
@pytest.mark.parametrize(
    "main, argv, says", NOT_FINITE, ids=[f"{m.__name__} {' '.join(a)}" for m, a, _ in NOT_FINITE]
)
def test_a_flag_that_is_not_finite_is_one_line(main, argv, says):
    assert says in run_cli(main.main, argv)


# ------------------------------------------------------------ 3. NaN or inf in logits and scores


@pytest.fixture(scope="module")
def nan_pair(tmp_path_factory, tok):
    """test_label's bigram pair, whose response to any prompt is known, and a router for its SLM;
    and a copy of each with NaN in it: the SLM and the LLM read "+", new token 3 of their
    responses, as a NaN embedding (so token 4 has NaN logits); the router has NaN weights."""
    root = tmp_path_factory.mktemp("nan")
    plus = tok.convert_tokens_to_ids("+")
    folders = {}
    for name, table in (("SLM", SLM_NEXT), ("LLM", LLM_NEXT)):
        model = bigram_model(tok, table)
        folders[name] = save(model, tok, root / "ok" / name.lower())
        with torch.no_grad():
            model.model.embed_tokens.weight[plus] = float("nan")
        folders[f"nan-{name}"] = save(model, tok, root / "nan" / name.lower())
    slm = r2r.load_model(folders["SLM"])
    router = r2r.Router(slm.config.hidden_size, 8, 8, 1, slm=r2r.fingerprint(slm, tok))
    folders["router"] = str(root / "ok" / "router")
    train_router.save_router(router, folders["router"])
    with torch.no_grad():
        for p in router.parameters():
            p.fill_(float("nan"))
    folders["nan-router"] = str(root / "nan" / "router")
    train_router.save_router(router, folders["nan-router"])
    return folders


NAN_CASES = {
    "SLM": (["--mode", "slm"], "the SLM gave NaN or inf logits at new token 4 (fp16 overflow?"),
    "LLM": (["--mode", "llm"], "the LLM gave NaN or inf logits at new token 4 (fp16 overflow?"),
    "router": ([], "the router gave NaN or inf scores at new token 1 (are its weights NaN?"),
}


@pytest.mark.parametrize("engine", ["eager", "fast", "batch"])
@pytest.mark.parametrize("broken", list(NAN_CASES))
def test_nan_logits_or_scores_stop_decoding_in_one_line(nan_pair, broken, engine, capsys):
    flags, says = NAN_CASES[broken]
    models = {name: nan_pair[f"nan-{name}" if name == broken else name] for name in NAN_CASES}
    argv = ["--slm", models["SLM"], "--llm", models["LLM"], "--router", models["router"]]
    # Prompts without "+"; two at once for decode_batch.
    argv += flags + ["--prompt", "12", "--max-new-tokens", "8"]
    argv += (
        ["--engine", "eager", "--prompt", "34", "--batch-size", "2"] if engine == "batch" else []
    )
    argv += ["--engine", engine] if engine != "batch" else []
    rc, err = cli(generate.main, argv, capsys)
    assert rc == 1 and one_error(err).startswith(f"error: {says}"), err


def test_finite_models_still_decode(nan_pair, capsys):
    argv = ["--slm", nan_pair["SLM"], "--llm", nan_pair["LLM"], "--router", nan_pair["router"]]
    rc, err = cli(generate.main, argv + ["--prompt", "12", "--max-new-tokens", "8"], capsys)
    assert rc == 0 and "error" not in err


# ------------------------------------------------------------ 4.-5. files missing, damaged or old


def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def edit_json(path, change):
    with open(path) as f:
        obj = json.load(f)
    change(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def labels(tmp_path_factory, tok):
    """label.py's folder for test_label's bigram pair (two shards), and the arguments that made
    it."""
    root = tmp_path_factory.mktemp("labels")
    for name, table in (("slm", SLM_NEXT), ("llm", LLM_NEXT)):
        save(bigram_model(tok, table), tok, root / name)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": "4"}) + "\n" for p in "1234"))
    argv = ["--slm", str(root / "slm"), "--llm", str(root / "llm"), "--prompts", str(prompts)]
    argv += ["--batch-size", "2"]
    label.main(argv + ["--out", str(root / "labels")])
    return root / "labels", argv


def stats_file(folder):
    return os.path.join(folder, "shards", shards_done(folder)[0], "stats.json")


# (name, script, what is damaged and how, the file the line names); {tmp} is a fresh folder
# holding copies: slm/ and router/ of the demo pair, labels/ of the `labels` fixture.
DAMAGED = [
    ("prompts missing", generate, None, "{tmp}/missing.jsonl"),
    ("prompts not JSON", generate, lambda t: (t / "p.jsonl").write_text("{x\n"), "{tmp}/p.jsonl"),
    (
        "model config not JSON",
        generate,
        lambda t: (t / "slm" / "config.json").write_text("{x"),
        "{tmp}/slm/config.json",
    ),
    (
        "model weights truncated",
        generate,
        lambda t: truncate(t / "slm" / "model.safetensors"),
        "{tmp}/slm (damaged .safetensors weights",
    ),
    (
        "router config not JSON",
        generate,
        lambda t: (t / "router" / "config.json").write_text("{x"),
        "{tmp}/router/config.json",
    ),
    (
        "router config without a key",
        evaluate,
        lambda t: edit_json(t / "router" / "config.json", lambda c: c.pop("top_k")),
        "{tmp}/router/config.json has no top_k",
    ),
    (
        "router config with a wrong type",
        bench,
        lambda t: edit_json(t / "router" / "config.json", lambda c: c.update(threshold="0.5")),
        "{tmp}/router/config.json: threshold must be a number in [0, 1], not '0.5'",
    ),
    (
        "router config out of range",
        generate,
        lambda t: edit_json(t / "router" / "config.json", lambda c: c.update(top_k=0)),
        "{tmp}/router/config.json: top_k must be an integer >= 1, not 0",
    ),
    (
        "router weights truncated",
        generate,
        lambda t: truncate(t / "router" / "model.safetensors"),
        "cannot load the router {tmp}/router",
    ),
    (
        "label meta.json not JSON",
        train_router,
        lambda t: (t / "labels" / "meta.json").write_text("{x"),
        "{tmp}/labels/meta.json",
    ),
    (
        "label meta.json of an old folder",
        train_router,
        lambda t: edit_json(t / "labels" / "meta.json", lambda m: m.pop("fingerprint")),
        "{tmp}/labels/meta.json has no fingerprint",
    ),
    (
        "label meta.json not JSON, on resume",
        label,
        lambda t: (t / "labels" / "meta.json").write_text("{x"),
        "{tmp}/labels/meta.json",
    ),
    (
        "label folder without shards",
        train_router,
        lambda t: shutil.rmtree(t / "labels" / "shards"),
        "{tmp}/labels holds no labeled positions: label more prompts",
    ),
    (
        "a shard's stats.json not JSON",
        label,
        lambda t: open(stats_file(t / "labels"), "w").write("{x"),
        "{tmp}/labels/shards/00000-",
    ),
    ("judge_prompt.txt missing", label, None, "{tmp}/judge_prompt.txt (FileNotFoundError"),
    (
        "judge_prompt.txt with another field",
        label,
        lambda t: (t / "judge_prompt.txt").write_text("{context} {a} {b} {answer}"),
        "{tmp}/judge_prompt.txt (KeyError('answer'))",
    ),
]
# Faults found after the models load; every other before any model loads (the router's config
# too, item 5).
AFTER_MODELS = {
    "model config not JSON",
    "model weights truncated",
    "router weights truncated",
    "label meta.json not JSON, on resume",
    "a shard's stats.json not JSON",
}


@pytest.mark.parametrize("name, main, damage, names", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_a_damaged_file_is_one_line_that_names_it(
    name, main, damage, names, labels, tmp_path, monkeypatch, capsys
):
    for folder in ("slm", "router"):
        shutil.copytree(os.path.join(DEMO, folder), tmp_path / folder)
    shutil.copytree(labels[0], tmp_path / "labels")
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+2", "answer": "3"}\n')
    monkeypatch.setattr(label, "JUDGE_FILE", str(tmp_path / "judge_prompt.txt"))
    if damage is not None:
        damage(tmp_path)
    if name not in AFTER_MODELS:
        monkeypatch.setattr(r2r, "from_pretrained", lambda *a, **kw: pytest.fail("a model loaded"))
    argv = {
        generate: ["--slm", str(tmp_path / "slm"), "--router", str(tmp_path / "router")]
        + ["--prompts-file", str(tmp_path / ("missing.jsonl" if "missing" in name else "p.jsonl"))],
        evaluate: ["--router", str(tmp_path / "router"), "--limit", "1"],
        bench: ["--router", str(tmp_path / "router"), "--n-prompts", "1"],
        train_router: ["--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "r")],
        label: labels[1] + ["--out", str(tmp_path / "labels")],
    }[main]
    if "judge" in name:
        argv = argv + ["--verifier", os.path.join(DEMO, "llm")]
    rc, err = cli(main.main, argv, capsys)
    assert rc == 1 and names.replace("{tmp}", str(tmp_path)) in one_error(err), err


def test_a_damaged_router_config_is_one_line_from_the_command_line(tmp_path):
    """The same path as a user's: exit status 1, one stderr line, before any model loads."""
    shutil.copytree(os.path.join(DEMO, "router"), tmp_path / "router")
    edit_json(tmp_path / "router" / "config.json", lambda c: c.pop("threshold"))
    proc = script("generate.py", "--router", str(tmp_path / "router"), "--prompt", "1+2")
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 1
    assert err == f"error: {tmp_path}/router/config.json has no threshold: from an older r2r? " + (
        "make it again\n"
    )


# ------------------------------------------------------------ 6.-7. outputs, failed writes


@pytest.mark.usefixtures("no_models")
@pytest.mark.parametrize(
    "main, argv, folder",
    [
        (label, ["--out", "{tmp}/labels"], "{tmp}/labels"),
        (train_router, ["--out", "{tmp}/sub/router"], "{tmp}/sub"),
        (evaluate, ["--out", "{tmp}/rows.json"], "{tmp}"),
        (evaluate, ["--plot", "{tmp}/pareto.png"], "{tmp}"),
    ],
    ids=["label", "train_router", "evaluate --out", "evaluate --plot"],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    main, argv, folder, tmp_path, monkeypatch
):
    """As root every folder is writable, so the file system's answer is simulated."""

    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(r2r.tempfile, "TemporaryFile", denied)
    message = run_cli(main.main, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    folder = folder.replace("{tmp}", str(tmp_path))
    assert message == (
        f"error: cannot write to {folder}: permission denied: choose another {argv[0]}"
    )
    assert os.listdir(tmp_path) == [], "an output was made before the work"


@pytest.mark.usefixtures("no_models")
def test_an_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    message = run_cli(label.main, ["--out", str(tmp_path / "file" / "labels")])
    assert message == (
        f"error: cannot write to {tmp_path}/file/labels: not a directory: choose another --out"
    )


@pytest.mark.parametrize("fault", ["disk full", "Ctrl-C"])
def test_a_shard_write_that_fails_leaves_no_tmp(fault, labels, tmp_path, monkeypatch, capsys):
    def new_stream(path, schema):
        open(path, "w").write("half")
        if fault == "Ctrl-C":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device", os.path.dirname(path))

    monkeypatch.setattr(label.pa.ipc, "new_stream", new_stream)
    out = tmp_path / "labels"
    rc, err = cli(label.main, labels[1] + ["--out", str(out)], capsys)
    assert os.listdir(out / "shards") == []
    if fault == "Ctrl-C":
        assert rc == 130 and "error" not in err and "Traceback" not in err
    else:
        assert rc == 1 and one_error(err).endswith(".tmp: No space left on device")


def test_evaluate_rows_that_fail_to_write_leave_no_tmp(tmp_path):
    path = str(tmp_path / "rows.json")
    with pytest.raises(TypeError):
        evaluate.write_rows([{"method": object()}], path)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ 8. the router, written whole


def small_router(threshold):
    return r2r.Router(16, top_k=4, width=8, n_blocks=1, threshold=threshold, slm={"name": "x"})


def test_router_files_get_the_modes_of_any_file(tmp_path):
    train_router.save_router(small_router(0.5), str(tmp_path / "router"))
    with open(tmp_path / "plain", "w"):
        pass
    mode = os.stat(tmp_path / "plain").st_mode & 0o777
    for name in ("model.safetensors", "config.json", "README.md"):
        assert os.stat(tmp_path / "router" / name).st_mode & 0o777 == mode, name


@pytest.mark.parametrize("fails", [1, 2], ids=["renaming the old aside", "renaming the new in"])
def test_a_router_save_that_fails_midway_leaves_the_old_router_whole(fails, tmp_path, monkeypatch):
    folder = str(tmp_path / "router")
    train_router.save_router(small_router(0.25), folder)
    rename = os.rename
    calls = []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == fails:
            raise OSError(errno.EIO, "Input/output error", a)
        rename(a, b)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError):
        train_router.save_router(small_router(0.75), folder)
    monkeypatch.undo()
    assert len(calls) == fails + (fails == 2)
    assert r2r.Router.from_pretrained(folder).threshold == 0.25
    assert sorted(os.listdir(tmp_path)) == ["router"]
    train_router.save_router(small_router(0.75), folder)
    assert r2r.Router.from_pretrained(folder).threshold == 0.75
    assert sorted(os.listdir(tmp_path)) == ["router"]


def test_a_router_save_killed_between_the_renames_is_put_right_by_the_next(tmp_path):
    folder = str(tmp_path / "router")
    train_router.save_router(small_router(0.25), folder)
    # Killed after the old router went aside, before the new one came in.
    os.rename(folder, folder + ".old")
    os.makedirs(folder + ".tmp")
    train_router.save_router(small_router(0.75), folder)
    assert r2r.Router.from_pretrained(folder).threshold == 0.75
    assert sorted(os.listdir(tmp_path)) == ["router"]


# ------------------------------------------------------------ 9. warnings that say what differs


def test_a_router_for_other_weights_of_a_same_named_slm_says_so(tmp_path, tok, capsys):
    mine, other = (
        save(tiny_model("llama", tok, 1, 32, seed=s), tok, tmp_path / d / "slm")
        for s, d in ((1, "a"), (2, "b"))
    )
    want, have = (r2r.fingerprint(r2r.load_model(f), tok) for f in (other, mine))
    router = r2r.Router(32, top_k=8, width=8, n_blocks=1, slm=have)
    train_router.save_router(router, str(tmp_path / "router"))
    slm = r2r.load_model(other)
    capsys.readouterr()
    r2r.load_router(str(tmp_path / "router"), slm, tok)
    assert have["name"] == want["name"] == "slm"
    assert (
        f"warning: the router {tmp_path}/router was trained for an SLM named slm with other "
        f"weights (embedding hash {have['embedding_sha']}, this SLM's {want['embedding_sha']})"
    ) in capsys.readouterr().err.splitlines()


# ------------------------------------------------------------ 10. run-time notes


def test_soft_capped_logits_are_noted_when_sampling_and_greedy_is_unaffected(tok, capsys):
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        initializer_range=0.5,
        final_logit_softcapping=5.0,
    )
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(config).eval()
    ids = torch.tensor([tok.encode("12+34")])
    with torch.no_grad():
        own = gemma(ids).logits[0]
        mine = r2r.forward(gemma, ids)[1][0]
    # Other probabilities, the same argmax.
    assert not torch.allclose(own.softmax(-1), mine.softmax(-1), atol=1e-3)
    assert torch.equal(own.argmax(-1), mine.argmax(-1))
    llama = tiny_model("llama", tok, 1, 32)
    generate.note_sampling(0.0, llama, gemma)
    generate.note_sampling(0.7, llama, llama)
    assert capsys.readouterr().err == ""
    generate.note_sampling(0.7, llama, gemma)
    assert capsys.readouterr().err.count("soft-caps its logits") == 1


def test_a_dated_chat_template_is_noted_once_when_labeling(tmp_path, tok, capsys):
    dated = build_dated(tok)
    folders = {
        name: save(bigram_model(dated, table), dated, tmp_path / name)
        for name, table in (("slm", SLM_NEXT), ("llm", LLM_NEXT))
    }
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": "4"}) + "\n" for p in "123"))
    argv = ["--slm", folders["slm"], "--llm", folders["llm"], "--prompts", str(prompts)]
    label.main(argv + ["--batch-size", "1", "--out", str(tmp_path / "labels")])
    assert capsys.readouterr().err.count("writes today's date into every prompt") == 1
    label.main(argv + ["--no-chat-template", "--batch-size", "1", "--out", str(tmp_path / "raw")])
    assert "today's date" not in capsys.readouterr().err


def build_dated(tok):
    """The demo tokenizer with a chat template that could write the date (Llama 3.1's
    strftime_now), in a branch never taken: the same prompts, a template that names the date."""
    from demo.build import build_tokenizer

    dated = build_tokenizer()
    dated.chat_template = "{% if false %}{{ strftime_now('%d %b %Y') }}{% endif %}" + (
        tok.chat_template
    )
    return dated
