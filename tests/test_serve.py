"""serve.py, started on the demo pair in a subprocess on a free loopback port and driven with the
official openai client, against independent oracles: r2r.decode on the same pair in this process
(each request's batch-1 decode) and generate.py's --json output. Bad requests against OpenAI's
error shape, each followed by a request that must still be answered right."""

import asyncio
import functools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import openai
import pytest
import torch
from conftest import ROOT

import generate
import r2r
import serve
from demo.build import build_tokenizer

PROMPT = "4837+2956"
KEY = "test-key"
MODEL = "slm+llm+router"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server's base URL (…/v1): --port 0 and its status line say which port it took."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    cmd = [sys.executable, os.path.join(ROOT, "serve.py"), "--port", "0", "--api-key", KEY]
    cmd += ["--max-tokens", "64", "--max-body-bytes", "20000"]
    # One thread for the server: this process decodes the oracles on the other core.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
    try:
        deadline = time.time() + 120
        while not (found := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        yield found.group(1)
        # Whatever the tests sent, the server neither died nor printed a traceback.
        assert proc.poll() is None and "Traceback" not in log.read_text(), log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def demo(demo_pair):
    """The demo pair's eager engine, router and tokenizer, in this process."""
    slm, llm, tok = demo_pair
    router = r2r.load_router(os.path.join(ROOT, "demo", "router"), slm, tok)
    return r2r.EagerEngine(slm, llm, tok), router, tok


@pytest.fixture(scope="module")
def alone(demo):
    """The oracle: a prompt's own batch-1 decode by r2r.decode -> (trace, text)."""
    engine, router, tok = demo

    @functools.cache  # the same prompt's decode serves several tests
    def decode(prompt, max_tokens, temperature=0.0, top_p=1.0, seed=0):
        ids, gen = r2r.encode_prompt(tok, prompt), torch.Generator().manual_seed(seed)
        trace = r2r.decode(
            engine,
            router,
            ids,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=gen,
        )
        return trace, tok.decode(trace.tokens, skip_special_tokens=True)

    return decode


def ask(client, prompt, stream=False, **kw):
    """(content, finish_reason, usage, r2r) of one answer, streamed or not, by the openai client."""
    messages = [dict(role="user", content=prompt)] if isinstance(prompt, str) else prompt
    r = client.chat.completions.create(model=MODEL, messages=messages, stream=stream, **kw)
    if not stream:
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage, r.r2r
    chunks = list(r)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[:-1] == [None] * (len(chunks) - 1), "only the last chunk ends the stream"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    return text, reasons[-1], chunks[-1].usage, chunks[-1].r2r


def stats(trace):
    return dict(
        llm_share=trace.llm_share, llm_calls=len(trace.gaps), mean_catch_up=trace.mean_catch_up
    )


def test_health_needs_no_key_and_models_name_the_pair_and_router(server, client):
    assert httpx.get(server.removesuffix("/v1") + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_answer_equals_generate_py_json(client, demo_pair, capsys):
    generate.main(["--prompt", PROMPT, "--json", "--max-new-tokens", "64"])
    want = json.loads(capsys.readouterr().out)
    assert want["token_ids"][-1] == 3 and 0 < want["llm_share"] < 1, "EOS, and both models write"
    text, reason, usage, got = ask(client, PROMPT, max_tokens=64)
    assert (text, reason) == (want["text"], "stop")
    assert usage.completion_tokens == len(want["token_ids"])
    assert usage.prompt_tokens == len(r2r.encode_prompt(demo_pair[2], PROMPT))
    for k in ("llm_share", "llm_calls", "mean_catch_up"):
        assert got[k] == pytest.approx(want[k]), k


def test_stream_equals_decode(client, alone):
    trace, text = alone(PROMPT, 64)
    got = ask(client, PROMPT, stream=True, max_tokens=64)
    assert got[:2] == (text, "stop")
    assert got[2].completion_tokens == len(trace.tokens)
    assert {k: got[3][k] for k in stats(trace)} == pytest.approx(stats(trace))


def test_stream_is_server_sent_events_ending_in_done(server, alone):
    body = dict(messages=[dict(role="user", content=PROMPT)], max_tokens=8, stream=True)
    headers = dict(authorization=f"Bearer {KEY}")
    with httpx.stream("POST", server + "/chat/completions", json=body, headers=headers) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) > 8 and text == alone(PROMPT, 8)[1]
    assert chunks[-1]["usage"]["completion_tokens"] == 8 and "r2r" in chunks[-1]


def test_multi_turn_messages_go_through_the_chat_template(client, alone, demo_pair):
    # The demo template joins every message's content: these four turns are the prompt PROMPT.
    turns = [("system", "48"), ("user", "37+"), ("assistant", "29"), ("user", "56")]
    messages = [dict(role=r, content=c) for r, c in turns]
    assert "".join(c for _, c in turns) == PROMPT
    assert ask(client, messages, max_tokens=64)[0] == alone(PROMPT, 64)[1]
    assert ask(client, messages[-1:], max_tokens=64)[0] != alone(PROMPT, 64)[1]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_ends_the_text_before_the_stop_string(client, alone, demo_pair, stream):
    _, _, tok = demo_pair
    trace, text = alone(PROMPT, 64)
    # A stop string of two tokens: a stream must hold back "write" until " 3" decides.
    stop = "write 3"
    assert text.count("write") > 1 and stop in text
    n = next(
        n for n in range(1, 65) if stop in tok.decode(trace.tokens[:n], skip_special_tokens=True)
    )
    got = ask(client, PROMPT, stream=stream, max_tokens=64, stop=[stop, "nowhere"])
    assert got[:2] == (text[: text.index(stop)], "stop")
    assert got[2].completion_tokens == n < len(trace.tokens)


@pytest.mark.parametrize("stream", [False, True])
def test_length(client, alone, stream):
    trace, text = alone(PROMPT, 7)
    got = ask(client, PROMPT, stream=stream, max_completion_tokens=7)
    assert got[:2] == (text, "length") and got[2].completion_tokens == 7
    assert ask(client, PROMPT, stream=stream, max_tokens=5)[0] == alone(PROMPT, 5)[1]


def test_sampling_follows_the_seed(client, alone):
    kw = dict(temperature=1.5, top_p=0.95)
    _, text = alone(PROMPT, 16, seed=7, **kw)
    assert text != alone(PROMPT, 16)[1], "the test needs a sample that differs from greedy"
    assert ask(client, PROMPT, max_tokens=16, seed=7, **kw)[0] == text


def test_concurrent_clients_get_their_answers_alone(server, client, alone):
    with open(os.path.join(ROOT, "demo", "test.jsonl")) as f:
        prompts = [json.loads(line)["prompt"] for line in f][:16]
    wants = [alone(p, 16)[1] for p in prompts]
    got, start = [None] * len(prompts), threading.Barrier(len(prompts) + 1)

    def one(i):
        c = openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)
        start.wait()
        got[i] = ask(c, prompts[i], stream=i % 2 == 1, max_tokens=16)

    def leave():
        # Reads the first chunks of a long answer, then hangs up.
        c = openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)
        start.wait()
        messages = [dict(role="user", content=PROMPT)]
        s = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, stream=True)
        next(iter(s))
        next(iter(s))
        s.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    threads.append(threading.Thread(target=leave))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [g[0] for g in got] == wants
    sizes = [g[3]["batch_size"] for g in got]
    assert max(sizes) > 1 and max(sizes) <= 16, sizes
    assert ask(client, PROMPT, max_tokens=64)[0] == alone(PROMPT, 64)[1]


GOOD = dict(messages=[dict(role="user", content=PROMPT)])
BAD = {
    "malformed JSON": (b'{"messages": [', 400),
    "a wrong type": (dict(GOOD, max_tokens="ten"), 422),
    "messages not a list": (dict(messages=PROMPT), 422),
    "missing messages": (dict(model=MODEL), 422),
    "no messages": (dict(messages=[]), 422),
    "an empty message": (dict(messages=[dict(role="user", content="")]), 422),
    "an unknown role": (dict(messages=[dict(role="wizard", content=PROMPT)]), 422),
    "n=2": (dict(GOOD, n=2), 422),
    "an empty stop string": (dict(GOOD, stop=[""]), 422),
    "a negative temperature": (dict(GOOD, temperature=-1), 422),
    "max_tokens over the server's": (dict(GOOD, max_tokens=65), 400),
    "an over-long prompt": (dict(messages=[dict(role="user", content="1" * 300)]), 400),
    "a body over --max-body-bytes": (dict(messages=[dict(role="user", content="1" * 30000)]), 413),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_an_error_object_and_the_server_goes_on(server, client, alone, case):
    body, status = BAD[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(server + "/chat/completions", content=content, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    assert ask(client, PROMPT, max_tokens=4)[0] == alone(PROMPT, 4)[1]


def test_a_nan_temperature_is_called_not_finite(server):
    """Not "less than or equal to 2", which NaN fails like every bound."""
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for field in ("temperature", "top_p"):
        body = json.dumps(dict(GOOD, **{field: float("nan")})).encode()
        r = httpx.post(server + "/chat/completions", content=body, headers=headers)
        assert r.status_code == 422 and "finite number" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_a_bad_or_missing_key_is_refused(server, client, alone, key):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    for r in (
        httpx.get(server + "/models", headers=headers),
        httpx.post(server + "/chat/completions", json=GOOD, headers=headers),
    ):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    if key:  # the openai client itself refuses to send no key
        with pytest.raises(openai.AuthenticationError):
            ask(openai.OpenAI(base_url=server, api_key=key, max_retries=0), PROMPT)
    assert ask(client, PROMPT, max_tokens=4)[0] == alone(PROMPT, 4)[1]


def test_unknown_path_or_method_gets_an_error_object(server):
    headers = {"authorization": f"Bearer {KEY}"}
    r = httpx.get(server + "/nothing", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    r = httpx.get(server + "/chat/completions", headers=headers)
    assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"


def test_safe_defaults_and_a_taken_port_refused_before_models_load():
    args = serve.parse_args([])
    assert (args.host, args.api_key) == ("127.0.0.1", None)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        with pytest.raises(r2r.R2RError, match="cannot listen"):
            serve.main(["--port", port, "--slm", "nowhere/slm"])


# ----------------------------------------------------------------------------- text, unit by unit


def feed(reply, text, step=1):
    """What a client receives of `text` arriving `step` characters at a time, then as final."""
    sent = [reply.update(text[:n], final=False) for n in range(1, len(text), step)]
    sent.append(reply.update(text, final=True))
    return tuple("".join(parts) for parts in zip(*sent)), sent


def test_a_stream_holds_back_what_may_become_a_stop_string():
    text = "7 + 6 = 1 3 , write 9 ; write 3 c 1"
    (reasoning, content), sent = feed(serve.Reply(["write 3"], None), text)
    assert (reasoning, content) == ("", "7 + 6 = 1 3 , write 9 ; ")
    # Nothing sent ever runs past the cut, and "write 9" was sent once " 9" ruled out "write 3".
    prefix = "".join(s[1] for s in sent[: text.index("write 9") + 7])
    assert prefix.endswith("write 9")


@pytest.mark.parametrize(
    "text, opened, want",
    [
        ("<think>\nadd 7 and 6</think>\n\n13", False, ("\nadd 7 and 6", "\n\n13")),
        ("add 7 and 6</think>13", True, ("add 7 and 6", "13")),
        ("still thinking", True, ("still thinking", "")),
        ("13", False, ("", "13")),
        ("<think>13</think>", None, ("", "<think>13</think>")),
    ],
)
def test_thinking_goes_to_reasoning_content(text, opened, want):
    assert feed(serve.Reply([], opened), text)[0] == want
    assert serve.split(text, opened) == want


@pytest.mark.parametrize("opens, want", [("", None), ("<think>", True), ("<think></think>", False)])
def test_a_thinking_block_the_template_opens(opens, want):
    """make_job on the demo tokenizer with the thinking tags added (want None: without them) and a
    template whose generation prompt ends with `opens`, as DeepSeek-R1's ends with <think>."""
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %} :" + opens
    tok.add_tokens(list(serve.THINK) if want is not None else [])
    args = types.SimpleNamespace(max_tokens=64, max_prompt_tokens=None, no_chat_template=False)
    req = serve.ChatRequest(messages=[dict(role="user", content=PROMPT)])

    async def make():
        return serve.make_job(
            req, tok, types.SimpleNamespace(limits=r2r.Limits(frozenset(), 256)), args
        )

    job = asyncio.run(make())
    assert job.reply.opened is want and tok.decode(job.ids).replace(" ", "").endswith(opens)
    assert (
        job.reply.update("add</think>13", final=True)
        == ({None: ("", "add</think>13"), True: ("add", "13"), False: ("", "add</think>13")}[want])
    )


def test_a_split_character_waits_for_its_last_bytes():
    reply = serve.Reply([], None)
    assert reply.update("ab\ufffd", final=False) == ("", "ab")
    assert reply.update("abé", final=False) == ("", "é")


def test_rows_leave_the_batch_when_their_client_goes_or_their_positions_end(
    demo_pair, demo, alone, monkeypatch
):
    """The worker in this process, on three jobs of 16 new tokens: one that gets them, one whose
    longer prompt runs out of positions first, one whose client goes after its third piece of text.
    The SLM's batch (its rows at each step) must shrink as they leave, and the one that stays must
    get its batch-1 answer."""
    _, router, tok = demo
    widths, log, want = [], [], alone(PROMPT, 16)[1]
    # Models of fewer positions: PROMPT and 16 new tokens fill them.
    engine = r2r.EagerEngine(*demo_pair)
    positions = len(r2r.encode_prompt(tok, PROMPT)) + 16
    engine.limits = engine.limits._replace(positions=positions)
    step = r2r.slm_step
    monkeypatch.setattr(
        r2r,
        "slm_step",
        lambda m, fresh, *a, **kw: widths.append(len(fresh)) or step(m, fresh, *a, **kw),
    )
    loop = types.SimpleNamespace(call_soon_threadsafe=lambda put, event: put(event))

    def job(i, prompt):
        def put(event):
            log.append((i, event))
            # The third client goes after its third piece of text.
            jobs[2].gone = jobs[2].gone or sum(j == 2 for j, _ in log) == 3

        queue = types.SimpleNamespace(put_nowait=put)
        key = dict(temperature=0.0, top_p=1.0)
        return serve.Job(
            r2r.encode_prompt(tok, prompt), 16, key, 0, serve.Reply([], None), queue, loop
        )

    jobs = [job(0, PROMPT), job(1, "48374837+29562956"), job(2, PROMPT)]
    serve.Worker(engine, router, tok, None).decode(jobs)
    ends = {i: (n, e) for n, (i, e) in enumerate(log) if "finish_reason" in e}
    text = "".join(e["delta"].get("content", "") for i, e in log if i == 0 and "delta" in e)
    assert text == want and ends[0][1]["finish_reason"] == "length"
    room = positions - len(jobs[1].ids)
    assert 1 < room < 16 and ends[1][1]["usage"]["completion_tokens"] == room
    assert ends[1][1]["finish_reason"] == "length" and ends[1][0] < ends[0][0]
    assert 2 not in ends and sum(j == 2 for j, _ in log) == 3
    assert widths == [3] * widths.count(3) + [2] * (room - widths.count(3)) + [1] * (16 - room), (
        widths
    )
    assert 0 < widths.count(3) < room
