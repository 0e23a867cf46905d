"""The demo task: its generator, the answer rule, and the shipped pair."""

import os
import random

import pytest
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

import label
import r2r
from demo.build import make_problem, solve


def test_scratchpad_is_correct_and_ends_in_the_answer():
    rng = random.Random(0)
    for _ in range(300):
        p = make_problem(rng)
        a, b = map(int, p["prompt"].split("+"))
        assert p["answer"] == str(a + b)
        assert r2r.final_answer(solve(p["prompt"], rng)) == p["answer"]


def test_scratchpad_worked_example():
    # 12 + 9: units 2 + 9 = 11, write 1 carry 1; tens 1 + 0 + 1 = 2; answer 21.
    rng = random.Random(0)
    texts = {solve("12+9", rng) for _ in range(200)}
    assert "2 + 9 + 0 = 1 1 , write 1 carry 1 ; 1 + 0 + 1 = 2 , write 2 carry 0 ; so 2 1" in texts
    # the neutral choices
    assert "9 + 2 + 0 = 1 1 , put 1 c 1 ; 0 + 1 + 1 = 2 , put 2 c 0 ; thus 2 1" in texts
    # operand order x write/put x carry/c x so/thus
    assert len(texts) == 16


@pytest.mark.parametrize(
    "text, answer",
    [
        ("... so 7 7 9 3", "7793"),
        ("... thus 1 2", "12"),
        ("so 42.", "42"),
        ("The answer is \\boxed{17}.", "17"),
        ("answer: 1,234", "1234"),
        ("", None),
        # Without a closing "so N": the last number, as GSM8K's graders read a response.
        ("7 + 6 + 0 = 1 3 , write 3", "3"),
        ("so 7 7 carry", "7"),
        ("garbage ###", None),
    ],
)
def test_answer_rule(text, answer):
    assert r2r.final_answer(text) == answer


def test_tokenizer_needs_no_spaces(demo_pair):
    _, _, tok = demo_pair
    assert tok.encode("4837+2956") == tok.encode("4 8 3 7 + 2 9 5 6")
    assert tok.unk_token_id not in tok.encode("4837+2956")


def test_shipped_models_load_offline_and_reach_their_accuracy():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    problems = r2r.read_prompts(os.path.join(ROOT, "demo", "test.jsonl"), limit=100)
    acc = {}
    for name in ("slm", "llm"):
        folder = os.path.join(ROOT, "demo", name)
        model, tok = (
            AutoModelForCausalLM.from_pretrained(folder),
            AutoTokenizer.from_pretrained(folder),
        )
        out = label.greedy_batch(model, tok, [p["prompt"] for p in problems], max_new_tokens=80)
        acc[name] = (
            sum(
                r2r.final_answer(tok.decode(r, skip_special_tokens=True)) == p["answer"]
                for (_, r, _), p in zip(out, problems)
            )
            / 100
        )
    assert acc["llm"] >= 0.93 and 0.4 <= acc["slm"] <= 0.85, acc
