"""What a real pair brings that the demo does not (issue 12): generation configs that
model.generate would obey, a 150K-token vocabulary, a judge that thinks first, nested
LaTeX answers, resumes with changed arguments, and a rehearsal of the GPU recipe."""

import argparse
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_model
from test_label import LLM_NEXT, PLANTED, RESPONSE, SLM_NEXT, bigram_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast

import evaluate
import fast
import generate
import label
import r2r
import train_router
from demo import rehearse

PROMPTS = ["4837+2956", "12+9", "305+77"]  # different lengths: batches are left-padded


def save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_prompts(path, prompts, answer="4"):
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "answer": answer}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def penalised(tmp_path_factory, tok):
    """A tiny pair whose generation configs carry what hub models ship: a repetition
    penalty and a no-repeat n-gram size (plus EOS), which model.generate would obey."""
    root = tmp_path_factory.mktemp("penalised")
    folders = {}
    for name, (layers, width, seed) in {"slm": (1, 32, 1), "llm": (2, 48, 2)}.items():
        model = tiny_model("llama", tok, layers, width, seed=seed)
        model.generation_config = GenerationConfig(
            repetition_penalty=1.5,
            no_repeat_ngram_size=2,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        folders[name] = save(model, tok, root / name)
    folders["prompts"] = write_prompts(root / "prompts.jsonl", PROMPTS)
    return folders


def generate_tokens(argv, capsys):
    """generate.py --json: the token ids of each prompt's response (r2r.decode, batch size 1)."""
    capsys.readouterr()
    generate.main(argv + ["--json"])
    return [
        json.loads(line)["token_ids"]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("{")
    ]


def test_label_responses_equal_generate_llm_despite_generation_config(
    penalised, tok, tmp_path, capsys
):
    llm, prompts = penalised["llm"], penalised["prompts"]
    # SLM = LLM: every position matches, so label.py stores every position of every response.
    label.main(
        [
            "--slm",
            llm,
            "--llm",
            llm,
            "--prompts",
            prompts,
            "--max-new-tokens",
            "24",
            "--keep-unfinished",
            "--out",
            str(tmp_path / "labels"),
        ]
    )
    ds = r2r.load_labels(str(tmp_path / "labels"))[1]
    stored = [
        [
            r["llm_token"]
            for r in sorted((r for r in ds if r["prompt_id"] == i), key=lambda r: r["position"])
        ]
        for i in range(len(PROMPTS))
    ]
    oracle = generate_tokens(
        [
            "--slm",
            llm,
            "--llm",
            llm,
            "--mode",
            "llm",
            "--max-new-tokens",
            "24",
            "--prompts-file",
            prompts,
        ],
        capsys,
    )
    assert stored == oracle
    # The configs matter: model.generate, obeying them, writes something else.
    model = r2r.load_model(llm)
    obeyed = [
        model.generate(torch.tensor([r2r.encode_prompt(tok, p)]), max_new_tokens=24)[0].tolist()
        for p in PROMPTS
    ]
    assert any(o[-24:] != s for o, s in zip(obeyed, stored))


def test_evaluate_single_model_rows_equal_generate_modes(penalised, tok, capsys):
    slm, llm, tok2 = r2r.load_pair(penalised["slm"], penalised["llm"])
    rows = r2r.read_prompts(penalised["prompts"])
    args = argparse.Namespace(batch_size=2, max_new_tokens=24)
    prompts = [r2r.encode_prompt(tok2, r["prompt"]) for r in rows]
    for mode, engine in (("slm", "eager"), ("llm", "eager"), ("llm", "fast")):
        traces = evaluate.decode_all(
            fast.pick_engine(slm, llm, tok2, kind=engine, max_tokens=200),
            None,
            prompts,
            args,
            tqdm(disable=True),
            mode=mode,
        )
        oracle = generate_tokens(
            [
                "--slm",
                penalised["slm"],
                "--llm",
                penalised["llm"],
                "--mode",
                mode,
                "--max-new-tokens",
                "24",
                "--prompts-file",
                penalised["prompts"],
            ],
            capsys,
        )
        assert [t.tokens for t in traces] == oracle, (mode, engine)


# ------------------------------------------------------------ memory at a real vocabulary

CHILD = """
import json, os, re, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(2)
from transformers import LlamaConfig, LlamaForCausalLM
import label
from demo.rehearse import synthetic_tokenizer
work, vocab = {work!r}, {vocab}
tok = synthetic_tokenizer(vocab)
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, head_dim=16, initializer_range=0.2,
    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
)
LlamaForCausalLM(config).save_pretrained(work + "/m")
tok.save_pretrained(work + "/m")
with open(work + "/p.jsonl", "w") as f:
    for i in range(16):
        prompt = " ".join(f"w{{100 + 37 * i + j}}" for j in range(8 + i))
        f.write(json.dumps(dict(prompt=prompt, answer="0")) + "\\n")
label.main([
    "--slm", work + "/m", "--llm", work + "/m", "--prompts", work + "/p.jsonl",
    "--batch-size", "16", "--max-new-tokens", "{new}", "--keep-unfinished", "--device", "cpu",
    "--out", work + "/labels",
])
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would count the pytest process that
# forked us.
print("PEAK_KIB", re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1))
"""


def run_child(code):
    """A fresh Python runs `code` -> its stdout; the test fails with its stderr."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_150k_vocabulary_labels_at_bounded_memory(tmp_path):
    """16 prompts x 256 new tokens x 150,000 ids: the old step 2 held (16, ~272, 150K) fp32
    logits, 2.6 GB on their own (on these sizes its process peaked at 3.0 GiB); slices of
    2^24 logits keep the whole run under 1 GiB."""
    out = run_child(CHILD.format(root=ROOT, work=str(tmp_path), vocab=150_000, new=256))
    peak_gib = int(out.split("PEAK_KIB")[1]) / 2**20
    positions = int(re.search(r"(\d+) positions from 16 responses", out).group(1))
    # nearly every position of every response was labeled
    assert positions > 16 * 200
    assert peak_gib < 1.5, f"peak RSS {peak_gib:.2f} GiB"


# ------------------------------------------------------------ label files at the paper's sizes

# One thread: on a shared machine two threads wait on each other (24 ms a matmul under load), and
# the memory measured does not depend on it. KiB() reads this process's own counters: VmHWM is
# its peak RSS, and writing 5 to clear_refs resets it to the RSS of now.
MEASURE = """
import json, os, re, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
import label, r2r, train_router
from demo.rehearse import synthetic_tokenizer
work = {work!r}

def kib(key):
    return int(re.search(key + r":\\s*(\\d+)", open("/proc/self/status").read()).group(1))

def reset():
    open("/proc/self/clear_refs", "w").write("5")
    return kib("VmRSS"), time.perf_counter()

# One layer of the paper's SLM width (R1-1.5B: 1,536), a vocabulary of 512.
tok = synthetic_tokenizer(512)
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=512, hidden_size=1536, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
    initializer_range=0.2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
)
model = LlamaForCausalLM(config)
# EOS never wins: every response is as long as the test asks.
with torch.no_grad():
    model.lm_head.weight[tok.eos_token_id] = 0
model.save_pretrained(work + "/m")
tok.save_pretrained(work + "/m")
"""

WRITE = """
with open(work + "/p.jsonl", "w") as f:
    for i in range(16):
        prompt = " ".join(f"w{{100 + 37 * i + j}}" for j in range(8 + i))
        f.write(json.dumps(dict(prompt=prompt, answer="0")) + "\\n")
# From the verdicts (step 4 done) to the shard on disk: the columns, then write_shard.
done, write, at = label.Steps.done, label.write_shard, {{}}

def step_done(self, i):
    done(self, i)
    if i == 3:
        at["rss"], at["t"] = reset()

def write_shard(path, columns, stats):
    n = write(path, columns, stats)
    print("WRITE", n, kib("VmHWM") - at["rss"], time.perf_counter() - at["t"])
    return n

label.Steps.done, label.write_shard = step_done, write_shard
label.main([
    "--slm", work + "/m", "--llm", work + "/m", "--prompts", work + "/p.jsonl",
    "--batch-size", "16", "--max-new-tokens", "2048", "--keep-unfinished", "--out", work + "/l",
])
"""


def test_a_shard_is_written_at_about_its_own_bytes(tmp_path):
    """label.py at a real SLM width, 16 prompts x 2,048 tokens: from the verdicts to the shard
    on disk the process grows by at most twice the shard's bytes, in seconds. The old rows of
    Python floats (32 bytes each, against 2 in float16) took 1.7 GB here before Arrow's copy."""
    out = run_child((MEASURE + WRITE).format(root=ROOT, work=str(tmp_path)))
    n, grew_kib, seconds = out.split("WRITE")[1].split()[:3]
    (shard,) = (tmp_path / "l" / "shards").glob("*/data.arrow")
    # (1,536 + 100) float16 features a position, plus the scalar columns
    assert int(n) == 16 * 2048 and shard.stat().st_size > int(n) * 1636 * 2
    assert int(grew_kib) * 1024 < 2 * shard.stat().st_size, (grew_kib, shard.stat().st_size)
    assert float(seconds) < 10


STREAM = """
# 460,000 positions of float16 features through label.py's writer: 1.5 GB in 10 shards of
# 46,000, 40 positions a prompt; positives (5%) have hidden[0] shifted by +4.
g = torch.Generator().manual_seed(0)
n = 46_000
noise = torch.randn(n, 1536, generator=g).half()
for s in range(10):
    y = (torch.rand(n, generator=g) < 0.05).long()
    hidden = noise.roll(s, 0)
    hidden[:, 0] += 4 * y
    ids = ((s * n + torch.arange(n)) // 40).tolist()
    columns = dict(
        prompt_id=ids,
        prompt_hash=ids,
        position=(torch.arange(n) % 40).tolist(),
        slm_token=torch.randint(0, 512, (n,), generator=g).tolist(),
        llm_token=[0] * n,
        kind=["divergent" if v else "identical" for v in y.tolist()],
        label=y.tolist(),
        hidden=[hidden],
        topk=[torch.randn(n, 100, generator=g).half()],
    )
    label.write_shard(f"{{work}}/labels/shards/{{s:05d}}", columns, {{}})
meta = dict(slm=work + "/m", fingerprint=r2r.fingerprint(model, tok), format=r2r.LABEL_FORMAT)
json.dump(meta, open(work + "/labels/meta.json", "w"))
del noise, hidden, columns
rss, t = reset()
metrics = train_router.main([
    "--labels", work + "/labels", "--out", work + "/router", "--epochs", "1", "--width", "16",
    "--blocks", "1",
])
print("TRAIN", kib("VmHWM") - rss, metrics["test"]["positions"], metrics["test"]["recall"])
"""


def test_router_training_streams_its_features(tmp_path):
    """train_router.py, one epoch on 1.5 GB of float16 features in a subprocess: training,
    early stopping and held-out scoring read a batch at a time, so the process grows by less than
    half the features' bytes (measured: about 0.5 GB, mostly a scoring batch of 8,192 positions
    at 3 x 1,536 floats, the same at any size); loading them whole took 1.5 GB or more."""
    os.makedirs(tmp_path / "labels" / "shards")
    out = run_child((MEASURE + STREAM).format(root=ROOT, work=str(tmp_path)))
    grew_kib, held_out, recall = out.split("TRAIN")[1].split()[:3]
    features = sum(f.stat().st_size for f in (tmp_path / "labels").glob("shards/*/data.arrow"))
    assert features > 1.5e9 and int(held_out) == 69_000
    assert int(grew_kib) * 1024 < features / 2, (grew_kib, features)
    # It learned the planted positives: every batch read its own rows.
    assert float(recall) > 0.9


# ------------------------------------------------------------ a judge that answers


def byte_tokenizer(template):
    """A byte-level tokenizer (every text round-trips) with a chat template of our own."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer, tk.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=template)
    tok.add_special_tokens(
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<think>", "</think>"],
        }
    )
    return tok


# Qwen3's switch: the assistant turn opens <think> unless enable_thinking is false.
THINKING = (
    "{% for m in messages %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}"
)


class ScriptedJudge(torch.nn.Module):
    """A judge whose reply we write: it reads each prompt, and answers "Output: 1" when the
    two marked tokens are different numbers, "Output: 0" otherwise; inside an open <think>
    it rambles with no verdict. It emits one token per call, as a causal LM does (its
    'hidden state' is the one-hot of the token to emit and lm_head the identity), and its
    cache holds as many (empty) positions as it has read."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.device = tok, torch.device("cpu")
        self.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
        # no position limit
        self.config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace())
        self.seen = []

    def reply(self, prompt):
        if prompt.endswith("<think>\n"):
            return "<think> Hmm, let me compare the two sentences carefully"
        a, b = (re.search(rf"Sentence {s}: .*?<<(.*?)>>", prompt).group(1).strip() for s in "AB")
        return f"Output: {int(a.isdigit() and b.isdigit() and a != b)}"

    def base_model(self, input_ids, cache=None, attention_mask=None, **kw):
        fresh = cache.get_seq_length() == 0
        # it keeps count
        cache.update(*[torch.zeros(*input_ids.shape[:1], 1, input_ids.shape[1], 1)] * 2, 0)
        # a new batch: read each prompt, write its reply
        if fresh:
            prompts = [self.tok.decode(ids[m.bool()]) for ids, m in zip(input_ids, attention_mask)]
            self.seen += prompts
            self.script = [
                self.tok.encode(self.reply(p)) + [self.tok.eos_token_id] for p in prompts
            ]
            self.step = 0
        else:
            # r2r.decode_batch drops a row from the batch once it has written its EOS
            self.script = [s for s in self.script if len(s) > self.step]
        nxt = torch.tensor([s[min(self.step, len(s) - 1)] for s in self.script])
        self.step += 1
        return types.SimpleNamespace(
            last_hidden_state=F.one_hot(nxt, len(self.tok)).float()[:, None]
        )  # (B, 1, V)

    def get_output_embeddings(self):
        return torch.nn.Identity()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tok):
    """test_label's exact bigram pair: mismatches at positions 0 and 7 are neutral
    (put/write, thus/so), at 8 divergent (5 instead of 4)."""
    root = tmp_path_factory.mktemp("planted")
    for name, table in (("slm", SLM_NEXT), ("llm", LLM_NEXT)):
        save(bigram_model(tok, table), tok, root / name)
    return dict(
        slm=str(root / "slm"),
        llm=str(root / "llm"),
        prompts=write_prompts(root / "prompts.jsonl", ["1+2", "30+4", "5+6"]),
    )


def test_scripted_judge_labels_planted_mismatches(planted, tok, tmp_path, monkeypatch):
    judge_tok = byte_tokenizer(THINKING)
    judge = ScriptedJudge(judge_tok)
    real_model, real_tok = r2r.load_model, r2r.load_tokenizer
    monkeypatch.setattr(
        r2r,
        "load_model",
        lambda path, *a, **kw: judge if path == "judge" else real_model(path, *a, **kw),
    )
    monkeypatch.setattr(
        r2r, "load_tokenizer", lambda path: judge_tok if path == "judge" else real_tok(path)
    )
    label.main(
        [
            "--slm",
            planted["slm"],
            "--llm",
            planted["llm"],
            "--prompts",
            planted["prompts"],
            "--verifier",
            "judge",
            "--judge-batch-size",
            "2",
            "--out",
            str(tmp_path / "labels"),
        ]
    )
    ds = r2r.load_labels(str(tmp_path / "labels"))[1]
    for pid in range(3):
        rows = sorted((r for r in ds if r["prompt_id"] == pid), key=lambda r: r["position"])
        assert [r["kind"] for r in rows] == [
            PLANTED.get(j, "identical") for j in range(len(RESPONSE))
        ], pid
    # 3 per prompt, no thinking
    assert len(judge.seen) == 9 and all(p.endswith("</think>\n\n") for p in judge.seen)
    # The oracle for the switch itself: left at the template's default, the judge thinks and
    # gives no verdict.
    ((_, default, _),) = label.greedy_batch(
        judge, judge_tok, [judge.seen[0][judge.seen[0].index("Two") :]], 16
    )
    assert label.parse_judge(judge_tok.decode(default)) is None


# ------------------------------------------------------------ answers


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}"),
        ("\\boxed{1} at first, then \\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
        ("$\\boxed{x^{2}+1}$.", "x^{2}+1"),
        ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
        ("\\boxed{5\\text{ cm}}", "5"),
        ("\\boxed{50\\%}", "50"),
        ("\\boxed{\\tfrac{1}{2}.}", "\\frac{1}{2}"),
        ("\\boxed{90^\\circ}", "90"),
        ("\\boxed{\\frac{1}{2}", None),
    ],
)
def test_nested_brace_answers(text, answer):
    assert r2r.final_answer(text) == answer


def test_equal_answers_compare_equal(tmp_path):
    path = tmp_path / "p.jsonl"
    with open(path, "w") as f:
        for ref in (
            "\\dfrac{1}{2}",
            "The solution ... so $\\boxed{\\frac{1}{2}}$.",
            "$\\frac{1}{2}$",
            "7793",
        ):
            f.write(json.dumps({"prompt": "x", "answer": ref}) + "\n")
    refs = [r2r.final_answer(r["answer"]) for r in r2r.read_prompts(str(path))]
    assert refs == ["\\frac{1}{2}"] * 3 + ["7793"]
    assert r2r.final_answer("thus \\boxed{\\dfrac{1}{2}}") == refs[0]


# ------------------------------------------------------------ resume, placement


def test_resume_with_changed_judge_span_fails_in_one_line(planted, tmp_path):
    argv = [
        "--slm",
        planted["slm"],
        "--llm",
        planted["llm"],
        "--prompts",
        planted["prompts"],
        "--out",
        str(tmp_path / "labels"),
    ]
    label.main(argv + ["--judge-span", "64"])
    with pytest.raises(SystemExit) as e:
        r2r.run_main(lambda: label.main(argv + ["--judge-span", "8"]))
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and "judge_span 64 -> 8" in message
    label.main(argv + ["--judge-span", "64"])  # the same arguments still resume


def test_train_router_puts_router_features_and_embeddings_on_its_device(
    planted, tmp_path, monkeypatch
):
    """--device meta: any tensor left on the CPU meets a meta one and raises."""
    label.main(
        [
            "--slm",
            planted["slm"],
            "--llm",
            planted["llm"],
            "--prompts",
            planted["prompts"],
            "--out",
            str(tmp_path / "labels"),
        ]
    )
    real = train_router.load_features
    monkeypatch.setattr(
        train_router,
        "load_features",
        lambda folder, device: (lambda d, slm, t, m: (d, slm.to(device), t, m))(
            *real(folder, "cpu")
        ),
    )
    seen = {}

    def one_step(router, emb_table, data, y, tr_idx, va_idx, pos_weight, args):
        seen["loss"] = train_router.batch_loss(router, emb_table, data, y, tr_idx[:8], pos_weight)
        seen["devices"] = {
            p.device.type for p in list(router.parameters()) + list(emb_table.parameters())
        }
        # stop before anything reads a meta tensor's value
        raise KeyboardInterrupt

    monkeypatch.setattr(train_router, "fit", one_step)
    with pytest.raises(KeyboardInterrupt):
        train_router.main(
            ["--labels", str(tmp_path / "labels"), "--device", "meta", "--val-fraction", "0.34"]
        )
    assert seen["loss"].device.type == "meta" and seen["devices"] == {"meta"}


def test_device_map_reaches_from_pretrained(planted, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls, real = [], AutoModelForCausalLM.from_pretrained

    def spy(path, **kw):
        calls.append(kw.get("device_map"))
        return real(path, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    label.main(
        [
            "--slm",
            planted["slm"],
            "--llm",
            planted["llm"],
            "--prompts",
            planted["prompts"],
            "--device-map",
            "auto",
            "--out",
            str(tmp_path / "labels"),
        ]
    )
    # the SLM stays on --device, the LLM is placed by accelerate
    assert calls == [None, "auto"]
    assert len(r2r.load_labels(str(tmp_path / "labels"))[1]) == 3 * len(RESPONSE)


# ------------------------------------------------------------ the rehearsal


def test_rehearsal_runs_end_to_end_at_tiny_size(tmp_path, capsys):
    results = rehearse.main(
        [
            "--work",
            str(tmp_path),
            "--vocab-size",
            "3000",
            "--hidden-size",
            "32",
            "--layers",
            "1",
            "--router-width",
            "16",
            "--router-blocks",
            "1",
            "--max-new-tokens",
            "24",
            "--n-prompts",
            "3",
            "--prompt-len",
            "20",
            "--judge-span",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert list(results) == ["label", "train", "generate", "evaluate"]
    meta, ds = r2r.load_labels(str(tmp_path / "labels"))
    assert len(set(ds["prompt_id"])) == 3 and {"neutral", "divergent"} <= set(ds["kind"])
    out = capsys.readouterr().out
    assert "| SLM only |" in out and "| R2R (saved) |" in out and out.count("peak memory") >= 4
    config = json.load(open(tmp_path / "llm" / "generation_config.json"))
    assert config["repetition_penalty"] == 1.1 and config["no_repeat_ngram_size"] == 3


def test_rehearsal_of_the_data_path_at_tiny_size(tmp_path, capsys):
    """--data-path: 5,000 synthetic positions in shards of 64 prompts x 20, one epoch."""
    results = rehearse.main(
        [
            "--work",
            str(tmp_path),
            "--data-path",
            "5000",
            "--hidden-size",
            "32",
            "--vocab-size",
            "3000",
            "--max-new-tokens",
            "20",
            "--router-width",
            "16",
            "--router-blocks",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert list(results) == ["train"]
    out = capsys.readouterr().out
    # 1,280 positions a shard: 3 whole, then 1,160
    assert out.count("== shard") == 4 and "== shard 3: 1160 positions" in out
    meta, ds = r2r.load_labels(str(tmp_path / "labels"))
    assert len(ds) == 5000 and len(set(ds["prompt_id"])) == 250
    report = json.load(open(tmp_path / "router" / "training.json"))
    assert report["test"]["positions"] + report["validation"]["positions"] < 5000
