"""
Build the offline demo pair: a tiny SLM and LLM that share a tokenizer and show R2R's
phenomenon on one CPU (README, "The method").

The task is multi-digit addition with a scratchpad, one step per digit from the right:

    prompt   4837+2956
    response 7 + 6 + 0 = 1 3 , write 3 carry 1 ; 3 + 5 + 1 = 9 , write 9 carry 0 ; ...
             so 7 7 9 3

The data holds *neutral choice points*, each picked at random once per problem: the order
of the operands inside every step (`7 + 6` or `6 + 7`, so some neutral differences fall on
digit tokens), "write"/"put", "carry"/"c" and "so"/"thus". Where the two models pick
differently the reasoning is the same; where the small one gets a digit wrong, it is not.

Writes demo/{train,validation,test}.jsonl ({"prompt", "answer"}), one shared word-level
tokenizer, and demo/slm, demo/llm (Llama configs, `save_pretrained`). Training stops on a
validation check (greedy exact-answer accuracy), not a step count: on this task accuracy
jumps suddenly, and where it jumps moves with the seed.

    python demo/build.py            # everything from scratch (about 8 minutes, 2 CPU cores)
    python demo/build.py --check    # only report on the committed models
"""

import argparse
import json
import os
import random
import sys
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import r2r  # noqa: E402
from label import greedy_batch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["+", "=", ",", ";", "write", "put", "carry", "c", "so", "thus"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
# The prompt as the models see it: BOS, the user's text, then ":" opens the response.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} :{% endif %}"
)

# ------------------------------------------------------------ the task


def make_problem(rng, min_digits=2, max_digits=4):
    """A random problem: {"prompt": "4837+2956", "answer": "7793"}."""
    a, b = (
        rng.randint(10 ** (n - 1), 10**n - 1)
        for n in (rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits))
    )
    return {"prompt": f"{a}+{b}", "answer": str(a + b)}


def solve(prompt, rng):
    """The scratchpad response for "a+b", with its neutral choices drawn from rng.

    "12+9" -> "2 + 9 + 0 = 1 1 , write 1 carry 1 ; 1 + 0 + 1 = 2 , write 2 carry 0 ; so 2 1"
    (or "9 + 2 + 0 = ...", "put", "c", "thus": each chosen once per problem).
    """
    a, b = prompt.split("+")
    n = max(len(a), len(b))
    # digits from the right; missing ones are 0
    a, b = a.zfill(n)[::-1], b.zfill(n)[::-1]
    swap, write, carry, so = (rng.random() < 0.5 for _ in range(4))
    write, carry, so = (
        ("put" if write else "write"),
        ("c" if carry else "carry"),
        ("thus" if so else "so"),
    )
    steps, digits, c = [], [], 0
    for x, y in zip(a, b):
        x, y = (y, x) if swap else (x, y)
        s = int(x) + int(y) + c
        steps.append(f"{x} + {y} + {c} = {' '.join(str(s))} , {write} {s % 10} {carry} {s // 10} ;")
        digits.append(str(s % 10))
        c = s // 10
    answer = (str(c) if c else "") + "".join(reversed(digits))
    return " ".join(steps) + f" {so} " + " ".join(answer)


def build_tokenizer():
    """Word-level: every digit, symbol and word is one token, so "4837+2956" needs no spaces."""
    vocab = {t: i for i, t in enumerate(SPECIALS + [str(d) for d in range(10)] + WORDS + [":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Whitespace(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


# ------------------------------------------------------------ training


def encode_batch(tok, problems, rng):
    """Right-padded training batch; the loss sees only response tokens (and EOS)."""
    rows = []
    for p in problems:
        prompt = r2r.encode_prompt(tok, p["prompt"])
        response = tok.encode(solve(p["prompt"], rng), add_special_tokens=False) + [
            tok.eos_token_id
        ]
        rows.append((prompt, response))
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id)  # (B, T)
    labels = torch.full((len(rows), T), -100)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    return ids, labels, mask


@torch.no_grad()
def accuracy(model, tok, problems, batch_size=250):
    """Greedy exact-answer accuracy (the same answer rule every script uses)."""
    model.eval()
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        replies = greedy_batch(model, tok, [p["prompt"] for p in chunk], max_new_tokens=80)
        correct += sum(
            r2r.final_answer(tok.decode(r.response_ids, skip_special_tokens=True)) == p["answer"]
            for r, p in zip(replies, chunk)
        )
    model.train()
    return correct / len(problems)


def train(name, config, tok, val, held_out, target, max_steps, seed, batch_size=32, lr=2e-3):
    """Train from scratch until greedy validation accuracy reaches `target` (checked every
    50 steps), or until max_steps."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    print(
        f"{name}: {config.num_hidden_layers} layers x {config.hidden_size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"stop at val acc >= {target}"
    )
    t0, acc = time.time(), 0.0
    for step in range(1, max_steps + 1):
        problems = []
        while len(problems) < batch_size:
            p = make_problem(rng)
            if p["prompt"] not in held_out:
                problems.append(p)
        ids, labels, mask = encode_batch(tok, problems, rng)
        # warm up over 50 steps, then decay linearly to lr / 10
        for g in opt.param_groups:
            g["lr"] = lr * min(step / 50, 1 - 0.9 * step / max_steps)
        # fp32: bf16 autocast is slower on CPU
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            acc = accuracy(model, tok, val)
            print(
                f"{name} step {step:4d} | loss {loss.item():.4f} | val acc {acc:.3f} | "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
            if acc >= target:
                break
    return model, acc


def model_config(tok, layers, width):
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def save_jsonl(path, rows):
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def check(args):
    """Report on the committed pair: greedy accuracy on the test set (decode speed: bench.py)."""
    slm, llm, tok = r2r.load_pair(
        os.path.join(args.out, "slm"), os.path.join(args.out, "llm"), device="cpu"
    )
    test = r2r.read_prompts(os.path.join(args.out, "test.jsonl"))
    for name, model in (("SLM", slm), ("LLM", llm)):
        print(f"{name} test accuracy: {accuracy(model, tok, test):.3f} on {len(test)} problems")


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=HERE, help="folder for the data and the two models")
    p.add_argument("--seed", type=int, default=0, help="seed for the data and both trainings")
    p.add_argument(
        "--n-train", type=int, default=3000, help="training prompts written for label.py"
    )
    p.add_argument("--n-eval", type=int, default=500, help="validation and test prompts, each")
    p.add_argument(
        "--slm-target", type=float, default=0.6, help="stop the SLM at this validation accuracy"
    )
    p.add_argument(
        "--llm-target", type=float, default=0.98, help="stop the LLM at this validation accuracy"
    )
    p.add_argument(
        "--check", action="store_true", help="only report on the models already in --out"
    )
    args = p.parse_args()
    torch.set_num_threads(min(4, os.cpu_count()))
    if args.check:
        return check(args)

    # 1. Data: disjoint train / validation / test prompts.
    rng, seen, splits = random.Random(args.seed), set(), {}
    for split, n in (("test", args.n_eval), ("validation", args.n_eval), ("train", args.n_train)):
        rows = []
        while len(rows) < n:
            p = make_problem(rng)
            if p["prompt"] not in seen:
                seen.add(p["prompt"])
                rows.append(p)
        splits[split] = rows
        save_jsonl(os.path.join(args.out, f"{split}.jsonl"), rows)
    # 2. One tokenizer for both models; check the round trip (README, transformers 5.x notes).
    tok = build_tokenizer()
    assert tok.decode(tok.encode("4837+2956", add_special_tokens=False)) == "4 8 3 7 + 2 9 5 6"
    # 3. The models train on fresh random problems; the checks use 200 validation prompts.
    held_out = {p["prompt"] for p in splits["test"] + splits["validation"]}
    val = splits["validation"][:200]
    # Per decoded token at these sizes the cost follows depth more than width, so the LLM
    # is deep and narrow: 10 x 64 costs about 3.6x a step of the 2 x 96 SLM on 2 CPU cores.
    for name, layers, width, target, max_steps in (
        ("llm", 10, 64, args.llm_target, 1200),
        ("slm", 2, 96, args.slm_target, 2000),
    ):
        model, acc = train(
            name, model_config(tok, layers, width), tok, val, held_out, target, max_steps, args.seed
        )
        folder = os.path.join(args.out, name)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        print(f"saved {folder} (val acc {acc:.3f})")
    check(args)


if __name__ == "__main__":
    main()
