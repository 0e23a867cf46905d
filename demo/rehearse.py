"""
demo/rehearse.py: the README's GPU recipe rehearsed at real size with random weights:
label.py, train_router.py, generate.py and evaluate.py end to end, each step's time and
peak memory printed. For a GPU machine; no download.

    # one H100: Qwen3-0.6B + 8B
    python demo/rehearse.py --work /tmp/rehearsal --steps label,train
    # then, reusing those models and their router
    python demo/rehearse.py --work /tmp/rehearsal --steps generate,evaluate
    # CPU, seconds
    python demo/rehearse.py --vocab-size 2000 --hidden-size 32 --layers 1 --max-new-tokens 12
    # the data path alone, any machine: 2M labeled positions at R1-1.5B's width, one epoch
    python demo/rehearse.py --data-path 2000000 --router-width 128 --router-blocks 2

It builds in --work: a word-level tokenizer of 151,643 ids (Qwen3's count, made offline,
decoding to "w123 w456 ..."), a chat template that opens <think> unless enable_thinking is
false, prompts of random words, and random SLM / LLM / judge models from the published
configs (bench.CONFIGS) whose generation configs carry a repetition penalty, a no-repeat
n-gram size and Qwen3's sampling defaults, all of which our greedy rule must ignore.
Random models differ from trained ones in three ways, and the rehearsal says how it copes:
- They rarely write EOS: label.py runs with --keep-unfinished, so every response is
  exactly --max-new-tokens long, the size being rehearsed.
- A random pair disagrees at almost every position (a real one at about 11%), so labeling
  steps 3 and 4 run about 9x a real pair's branches per response: their times are upper
  bounds; --judge-span keeps them short.
- A random judge answers nothing parsable, so its lm_head keeps two rows only, the words
  "Output:0" and "Output:1", set from the judge's own states on a few judge prompts so that
  which one wins changes with the prompt: every reply is a verdict, and train_router.py
  gets both classes. Its chat template still thinks first
  unless label.py switches thinking off.
--data-path N rehearses R2R Stage 2's data at the paper's scale instead: N synthetic labeled
positions written through label.py's writer (write_shard) and one epoch of train_router.py on
them, each shard's and the epoch's time and peak memory printed.
"""

import argparse
import gc
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
import label  # noqa: E402
import r2r  # noqa: E402
import train_router  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# the judge's two replies are single words
WORDS = ["user", "assistant", "Output:0", "Output:1", ".", ";"]
# Qwen3's template in miniature: the assistant turn opens <think> unless enable_thinking is false.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant <think> {% if enable_thinking is defined "
    "and enable_thinking is false %}</think> {% endif %}{% endif %}"
)


def synthetic_tokenizer(n_ids=151643):
    """A word-level tokenizer of n_ids ids: the specials, the judge's words, then "w<id>".
    Text round-trips ("w7 w9" -> [7, 9] -> "w7 w9"); unknown words become <|endoftext|>."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), n_ids)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def words(tok, rng, n):
    """n random words of the synthetic vocabulary: "w4711 w815 ..."."""
    return " ".join(f"w{rng.randrange(len(SPECIALS) + len(WORDS), len(tok))}" for _ in range(n))


def random_model(name, tok, args, seed, judge=False):
    """Random weights from a published config (sizes overridden by --hidden-size/--layers)."""
    cfg = dict(bench.CONFIGS[name])
    if args.hidden_size:
        cfg.update(
            hidden_size=args.hidden_size,
            intermediate_size=3 * args.hidden_size,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=args.hidden_size // 2,
        )
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    config = AutoConfig.for_model(
        cfg.pop("model_type"), **cfg, eos_token_id=eos, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    if judge:
        with torch.no_grad():
            head, verdicts = (
                model.get_output_embeddings().weight,
                tok.convert_tokens_to_ids(["Output:0", "Output:1"]),
            )
            # so what follows a verdict hangs on the prompt
            model.get_input_embeddings().weight[verdicts] = 0
            # The states that pick a reply's later tokens (after a verdict), over 8 judge prompts:
            # w is the direction along which they differ most, the rows w and 2(w.m)m/|m|^2 - w
            # split them around their mean m, and every other row is zero, so each reply is
            # verdicts that change with the prompt.
            rng = random.Random(seed)
            h = torch.stack(
                [
                    r2r.forward(
                        model,
                        torch.tensor(
                            [
                                r2r.encode_prompt(
                                    tok,
                                    label.judge_prompt(
                                        words(tok, rng, 50),
                                        words(tok, rng, 3) + " <<w9>> ",
                                        words(tok, rng, 3) + " <<w11>> ",
                                    ),
                                    thinking=False,
                                )
                                + verdicts[:1]
                            ],
                            device=model.device,
                        ),
                        last=True,
                    )[0][0, -1]
                    for _ in range(8)
                ]
            ).float()  # (8, H)
            m = h.mean(0)
            w = torch.linalg.svd(h - m, full_matrices=False).Vh[0]
            # both verdict logits then sum to 2 w.m > 0, above the zero rows
            w = w if w @ m > 0 else -w
            head.zero_()  # (V, H)
            head[verdicts[0]], head[verdicts[1]] = w, 2 * (w @ m) * m / (m @ m) - w
    # What a hub model ships (Qwen3: sampling at 0.6 / top-k 20 / top-p 0.95; Qwen2.5: a
    # repetition penalty): the scripts' greedy paths must ignore all of it.
    model.generation_config = GenerationConfig(
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_k=20,
        top_p=0.95,
        repetition_penalty=1.1,
        no_repeat_ngram_size=3,
    )
    return model


def build(args):
    """Tokenizer, prompts and the three models in --work; kept if already there."""
    if os.path.exists(os.path.join(args.work, "judge", "config.json")):
        print(f"reusing the models in {args.work}")
        return
    tok = synthetic_tokenizer(args.vocab_size)
    rng = random.Random(0)
    text = words(tok, random.Random(1), 5)  # the round-trip check below
    with open(os.path.join(args.work, "prompts.jsonl"), "w") as f:
        for _ in range(args.n_prompts):
            f.write(json.dumps({"prompt": words(tok, rng, args.prompt_len), "answer": "0"}) + "\n")
    for seed, (role, name) in enumerate(
        (("slm", args.slm), ("llm", args.llm), ("judge", args.judge))
    ):
        t = time.perf_counter()
        model = random_model(name, tok, args, seed, judge=role == "judge")
        model.save_pretrained(os.path.join(args.work, role))
        tok.save_pretrained(os.path.join(args.work, role))
        # A qwen2 folder loads Qwen2's tokenizer class over our tokenizer.json
        # (README, transformers 5.x notes).
        again = r2r.load_tokenizer(os.path.join(args.work, role))
        if again.decode(again.encode(text, add_special_tokens=False)) != text:
            raise r2r.R2RError(
                f"{name}'s folder does not keep the synthetic tokenizer: pick a qwen3 config"
            )
        print(
            f"built {role}: {name}, {r2r.n_params(model) / 1e9:.2f}B parameters, "
            f"{time.perf_counter() - t:.0f}s"
        )
        del model


def reset_peak(device):
    """Peak memory counts from now: CUDA's counters, or on Linux the process's peak RSS (VmHWM),
    which writing 5 to /proc/self/clear_refs resets (elsewhere the peak since the start)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_gib(device):
    """Peak memory since reset_peak(device), in GiB."""
    if device.type == "cpu" and os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s*(\d+)", f.read()).group(1)) / 2**20
    return r2r.peak_memory_gib(device)


def timed_step(name, main, argv, device):
    """Run one script's main() in this process; print its time and peak memory."""
    reset_peak(device)
    t = time.perf_counter()
    main(argv)
    seconds, gib = time.perf_counter() - t, peak_gib(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, process peak RSS"
    print(f"== {name}: {seconds:.1f}s, peak memory {gib:.2f} GiB ({where})", flush=True)
    return seconds, gib


def data_path(args):
    """args.data_path synthetic labeled positions, 2,048 a prompt (--max-new-tokens) and 64
    prompts a shard (label.py's --batch-size), written by label.write_shard in float16 at
    --hidden-size, then train_router.main for one epoch: the disk, time and memory of R2R Stage
    2's data at the paper's scale. Positives (5%) have hidden[0] shifted by +4, so the held-out
    recall shows that every batch read its own rows. The SLM is one layer at that width with the
    tokenizer's vocabulary (--vocab-size), its embedding table as large as a real one's."""
    work, device = args.work, torch.device(args.device)
    args.layers = 1
    tok = synthetic_tokenizer(args.vocab_size)
    slm = random_model(args.slm, tok, args, seed=0)
    slm.save_pretrained(f"{work}/slm")
    tok.save_pretrained(f"{work}/slm")
    # A rerun with the same --work writes its labels anew.
    shutil.rmtree(f"{work}/labels", ignore_errors=True)
    os.makedirs(f"{work}/labels/shards")
    meta = dict(slm=f"{work}/slm", fingerprint=r2r.fingerprint(slm, tok), feature_dtype="float16")
    with open(f"{work}/labels/meta.json", "w") as f:
        json.dump(dict(meta, format=r2r.LABEL_FORMAT), f)
    del slm
    per_prompt, per_shard = args.max_new_tokens, 64 * args.max_new_tokens
    g = torch.Generator().manual_seed(0)
    for s, a in enumerate(range(0, args.data_path, per_shard)):
        reset_peak(device)
        t = time.perf_counter()
        n = min(per_shard, args.data_path - a)
        y = (torch.rand(n, generator=g) < 0.05).long()
        hidden = torch.randn(n, args.hidden_size, generator=g, dtype=torch.float16)  # (n, H)
        hidden[:, 0] += 4 * y
        topk = torch.randn(n, 100, generator=g).sort(descending=True).values.half()  # (n, k)
        ids = ((a + torch.arange(n)) // per_prompt).tolist()
        tokens = torch.randint(0, len(tok), (n,), generator=g).tolist()
        # A hash per prompt, not per position.
        keys = {i: label.prompt_key(f"prompt {i}") for i in set(ids)}
        columns = dict(
            prompt_id=ids,
            prompt_hash=[keys[i] for i in ids],
            position=((a + torch.arange(n)) % per_prompt).tolist(),
            slm_token=tokens,
            llm_token=tokens,
            kind=["divergent" if v else "identical" for v in y.tolist()],
            label=y.tolist(),
            hidden=[hidden],
            topk=[topk],
        )
        made = time.perf_counter()
        label.write_shard(f"{work}/labels/shards/{s:05d}", columns, {})
        gb = os.path.getsize(f"{work}/labels/shards/{s:05d}/data.arrow") / 1e9
        print(
            f"== shard {s}: {n} positions, {gb:.2f} GB; made {made - t:.1f}s, written "
            f"{time.perf_counter() - made:.1f}s; peak memory {peak_gib(device):.2f} GiB",
            flush=True,
        )
    train = train_flags(args, work) + ["--epochs", "1"]
    return {"train": timed_step("train", train_router.main, train, device)}


def train_flags(args, work):
    """train_router.py's flags for the labels in `work` and a router of --router-width x
    --router-blocks beside them."""
    flags = ["--labels", f"{work}/labels", "--out", f"{work}/router", "--device", args.device]
    return flags + ["--width", str(args.router_width), "--blocks", str(args.router_blocks)]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--work",
        default=None,
        help="folder for models, labels and router (default: a new temp folder); "
        "rerun with the same one to skip what is built",
    )
    p.add_argument(
        "--steps", default="label,train,generate,evaluate", help="comma-separated steps to run"
    )
    # sizes
    p.add_argument(
        "--slm",
        default="qwen3-0.6b",
        choices=list(bench.CONFIGS),
        help="published config of the SLM",
    )
    p.add_argument(
        "--llm", default="qwen3-8b", choices=list(bench.CONFIGS), help="published config of the LLM"
    )
    untied = [k for k, c in bench.CONFIGS.items() if not c["tie_word_embeddings"]]
    p.add_argument(
        "--judge",
        default="qwen3-14b",
        choices=untied,
        help="published config of the judge, one with its own lm_head "
        "(the README's recipe: a 14B judge)",
    )
    p.add_argument("--vocab-size", type=int, default=151643, help="tokenizer ids (Qwen3: 151,643)")
    p.add_argument(
        "--hidden-size", type=int, default=None, help="shrink every model to this width (tests)"
    )
    p.add_argument(
        "--layers", type=int, default=None, help="shrink every model to this many layers (tests)"
    )
    p.add_argument("--router-width", type=int, default=1024, help="router MLP width (paper: 1024)")
    p.add_argument("--router-blocks", type=int, default=6, help="router blocks (paper: 6)")
    # work
    p.add_argument(
        "--n-prompts",
        type=int,
        default=3,
        help="prompts (at least 3: train_router.py splits train, validation and held-out prompts)",
    )
    p.add_argument("--prompt-len", type=int, default=200, help="words per prompt")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="response length of every step")
    p.add_argument("--judge-span", type=int, default=8, help="label.py --judge-span")
    p.add_argument("--branch-tokens", type=int, default=65536, help="label.py --branch-tokens")
    p.add_argument("--judge-batch-size", type=int, default=32, help="label.py --judge-batch-size")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument(
        "--data-path",
        type=int,
        metavar="N",
        help="instead of the steps: N synthetic labeled positions at --hidden-size (default "
        "1536) through label.py's writer, then one epoch of train_router.py",
    )
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.n_prompts < 3:
        raise r2r.R2RError(
            "--n-prompts must be at least 3: train_router.py splits train, validation and held-out "
            "prompts"
        )
    args.work = args.work or tempfile.mkdtemp(prefix="r2r-rehearsal-")
    os.makedirs(args.work, exist_ok=True)
    if args.data_path:
        args.hidden_size = args.hidden_size or 1536
        return data_path(args)
    device, w = torch.device(args.device), args.work
    build(args)
    pair = [
        "--slm",
        f"{w}/slm",
        "--llm",
        f"{w}/llm",
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    n = ["--max-new-tokens", str(args.max_new_tokens)]
    steps = {
        "label": (
            label.main,
            pair
            + n
            + [
                "--verifier",
                f"{w}/judge",
                "--prompts",
                f"{w}/prompts.jsonl",
                "--keep-unfinished",
                "--judge-span",
                str(args.judge_span),
                "--batch-size",
                str(args.n_prompts),
                "--out",
                f"{w}/labels",
                "--branch-tokens",
                str(args.branch_tokens),
                "--judge-batch-size",
                str(args.judge_batch_size),
            ],
        ),
        "train": (
            train_router.main,
            train_flags(args, w)
            + ["--lr", "5e-5", "--epochs", "5", "--val-fraction", "0.3", "--test-fraction", "0.3"],
        ),
        "generate": (
            generate.main,
            pair
            + n
            + ["--router", f"{w}/router", "--prompts-file", f"{w}/prompts.jsonl", "--json"],
        ),
        "evaluate": (
            evaluate.main,
            pair
            + n
            + ["--router", f"{w}/router", "--prompts", f"{w}/prompts.jsonl", "--thresholds"],
        ),
    }
    wanted = args.steps.split(",")
    if set(wanted) - set(steps):
        raise r2r.R2RError(f"--steps takes {', '.join(steps)}, not {args.steps}")
    results = {name: timed_step(name, *steps[name], device) for name in steps if name in wanted}
    print(
        f"\nrehearsal in {w}: {args.slm} + {args.llm}, judge {args.judge}, "
        f"{args.n_prompts} prompts x {args.max_new_tokens} new tokens, "
        f"{args.dtype} on {args.device}"
    )
    for name, (seconds, gib) in results.items():
        print(f"  {name:9s} {seconds:8.1f}s  peak {gib:6.2f} GiB")
    return results


if __name__ == "__main__":
    r2r.run_main(main)
