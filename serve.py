"""
serve.py: R2R mixed decoding (R2R Stage 3) behind an OpenAI-compatible API, on FastAPI + uvicorn.

    python serve.py                 # the demo pair and router at http://127.0.0.1:8000/v1
    python serve.py --slm Qwen/Qwen3-0.6B --llm Qwen/Qwen3-8B --router router-qwen3 --api-key KEY

POST /v1/chat/completions takes OpenAI's fields (n = 1; temperature 0, greedy, by default) and
answers with usage and `r2r` (LLM share, LLM calls, mean catch-up, batch size), in a stream's last
chunk too; thinking (<think> ... </think>) goes to reasoning_content. GET /v1/models (the pair and
router as one model), GET /health. One worker decodes up to --max-batch-size waiting requests that
sample alike with r2r.decode_batch on the eager engine (the fast one takes one prompt at a time),
each row's generator seeded by its request: in fp32 a request gets its batch-1 tokens. A request
that arrives mid-batch waits for the next (decode_batch takes no rows once started), so its first
token may wait a whole batch, up to that batch's longest max_tokens steps. max_tokens, stop strings
and a client gone end a row through stop=, and it leaves the batch. Binds 127.0.0.1 by default.
"""

import asyncio
import hmac
import json
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

import r2r

THINK = ("<think>", "</think>")


def parse_args(argv=None):
    p = r2r.parser(__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 opens it to all")
    p.add_argument("--port", type=int, default=8000, help="port; 0 takes a free one (printed)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (as vLLM, SGLang)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-tokens", type=int, default=256, help="default and most new tokens")
    p.add_argument("--max-prompt-tokens", type=int, help="default: the models' positions - 1")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    args = p.parse_args(argv)
    at_least = dict(port=0, max_batch_size=1, max_tokens=1, max_prompt_tokens=1, max_body_bytes=1)
    r2r.check_args(args, **at_least)
    return args


Text = Annotated[str, Field(min_length=1)]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(BaseModel):
    """The fields read; others (model, logprobs, ...) are ignored: one model is served."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Text | Annotated[list[Text], Field(max_length=16)] | None = None
    stream: bool = False
    n: Literal[1] | None = None  # one choice per request


class Refused(Exception):
    """A request refused before decoding: its HTTP status and OpenAI's error fields."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def respond(self):
        body = dict(message=str(self), type=self.kind, param=self.param, code=self.code)
        return JSONResponse(dict(error=body), status_code=self.status)


def held_back(text, marks):
    """`text` less what a later token may change: a trailing U+FFFD (a character's first bytes)
    and the longest end that begins a mark: held_back("1 , wri", ["write 3"]) -> "1 , "."""
    text = text.rstrip("\ufffd")
    for n in range(min(len(text), max(map(len, marks), default=0)), 0, -1):
        if any(m.startswith(text[-n:]) for m in marks):
            return text[:-n]
    return text


def split(text, opened):
    """(reasoning, content) of a response: the thinking block its prompt opened (opened=True) or it
    opens itself, up to </think>, then the rest. opened=None: a tokenizer without the tags."""
    if opened is not None and text.lstrip().startswith(THINK[0]):
        opened, text = True, text.lstrip()[len(THINK[0]) :]
    return text.partition(THINK[1])[::2] if opened else ("", text)


class Reply:
    """What a client has been sent of a response, as (reasoning, content): the text ends before the
    first stop string, and a stream never sends what a later token could take back."""

    def __init__(self, stops, opened):
        self.stops, self.opened = stops, opened
        self.marks = stops + (list(THINK) if opened is not None else [])
        self.sent, self.stopped = ("", ""), False

    def update(self, text, final):
        """The whole text so far -> the (reasoning, content) not sent yet."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        text, self.stopped = text[: min(hits, default=None)], bool(hits)
        parts = split(text if final or hits else held_back(text, self.marks), self.opened)
        sent, self.sent = self.sent, parts
        return tuple(p[len(s) :] for p, s in zip(parts, sent))


@dataclass(eq=False)
class Job:
    """A request on its way through the worker; its events go to `queue` on the server's loop."""

    ids: list
    max_tokens: int
    key: dict  # temperature and top_p: a batch samples alike
    seed: int
    reply: Reply
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    gone: bool = False
    done: bool = False

    def push(self, **event):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Worker:
    """The one decoder, started by the first job: batches of waiting jobs that sample alike."""

    def __init__(self, engine, router, tok, args):
        self.engine, self.router, self.tok, self.args = engine, router, tok, args
        self.waiting, self.wake, self.task = [], asyncio.Event(), None

    def submit(self, job):
        self.task = self.task or asyncio.create_task(self.run())
        self.waiting.append(job)
        self.wake.set()

    async def run(self):
        while await self.wake.wait():
            self.wake.clear()
            while self.waiting:
                key = self.waiting[0].key
                jobs = [j for j in self.waiting if j.key == key][: self.args.max_batch_size]
                self.waiting = [j for j in self.waiting if j not in jobs]
                if live := [j for j in jobs if not j.gone]:
                    await asyncio.to_thread(self.decode, live)

    def decode(self, jobs):
        """One batch, in the worker's thread; every job ends with a finish_reason or an error."""
        longest = max(j.max_tokens for j in jobs)
        self.batch_size = len(jobs)
        traces = [r2r.Trace() for _ in jobs]
        job_of = {id(t): j for t, j in zip(traces, jobs)}

        def stop(trace):
            return self.step(job_of[id(trace)], trace, final=False)

        def on_step(slm_cache, llm_cache, live):
            # A row at its last position left the batch without a call to stop: it ends here.
            for trace in [t for t in traces if all(t is not x for x in live)]:
                self.step(job_of[id(trace)], trace, final=True)

        key = jobs[0].key  # temperature and top_p
        prompts = [j.ids for j in jobs]
        # All of it: an error that escaped would end the worker, and every later request wait.
        try:
            gens = [torch.Generator(self.engine.llm.device).manual_seed(j.seed) for j in jobs]
            kw = dict(generators=gens, eos=set(), on_step=on_step, stop=stop, traces=traces)
            r2r.decode_batch(self.engine, self.router, prompts, max_new_tokens=longest, **kw, **key)
            for job, trace in zip(jobs, traces):
                self.step(job, trace, final=True)
        except Exception as e:  # the server goes on; this batch's clients hear why
            for job in jobs:
                job.push(error=f"decoding failed ({type(e).__name__}: {str(e).splitlines()[0]})")

    def step(self, job, trace, final):
        """After a commit: the job's new text to its client. True where its row ends."""
        if job.done or job.gone:
            return True
        eos = trace.tokens[-1] in self.engine.limits.eos
        end = final or eos or len(trace.tokens) >= job.max_tokens
        text = self.tok.decode(trace.tokens, skip_special_tokens=True)
        delta = dict(zip(("reasoning_content", "content"), job.reply.update(text, end)))
        if any(delta.values()):
            job.push(delta={k: v for k, v in delta.items() if v})
        job.done = end or job.reply.stopped
        if job.done:
            n, p = len(trace.tokens), len(job.ids)
            usage = dict(prompt_tokens=p, completion_tokens=n, total_tokens=p + n)
            stats = dict(llm_share=trace.llm_share, llm_calls=len(trace.gaps))
            stats.update(mean_catch_up=trace.mean_catch_up, batch_size=self.batch_size)
            reason = "stop" if eos or job.reply.stopped else "length"
            job.push(finish_reason=reason, usage=usage, r2r=stats)
        return job.done


def make_job(req, tok, engine, args):
    """A request checked against every limit, as a Job; a Refused says what is wrong."""
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    max_tokens = req.max_completion_tokens or req.max_tokens or args.max_tokens
    if max_tokens > args.max_tokens:
        raise Refused(400, f"max_tokens {max_tokens} is over this server's {args.max_tokens}")
    chat = tok.chat_template and not args.no_chat_template
    text = "\n".join(m.content for m in req.messages)  # without a chat template
    try:
        ids = r2r.encode_prompt(tok, [m.model_dump() for m in req.messages] if chat else text)
    except Exception as e:  # a template may raise on any conversation it does not take
        raise Refused(400, f"the chat template refuses these messages ({e})", "messages")
    limit = min(args.max_prompt_tokens or engine.limits.positions, engine.limits.positions - 1)
    if len(ids) > limit:
        why = f"the prompt has {len(ids)} tokens, over this server's {limit}: shorten it"
        raise Refused(400, why, "messages", "context_length_exceeded")
    # Thinking only where the tokenizer has both tags: the prompt opened a block it did not close.
    prompt, think = tok.decode(ids), tok.unk_token_id not in tok.convert_tokens_to_ids(THINK)
    reply = Reply(stops, prompt.rfind(THINK[0]) > prompt.rfind(THINK[1]) if think else None)
    # Greedy requests batch together whatever top_p they name.
    temperature = req.temperature or 0.0
    key = dict(temperature=temperature, top_p=(req.top_p or 1.0) if temperature else 1.0)
    seed = random.getrandbits(63) if req.seed is None else req.seed
    return Job(ids, max_tokens, key, seed, reply, asyncio.Queue(), asyncio.get_running_loop())


async def read_body(request, limit):
    """The body, refused (413) once it passes `limit` bytes, whatever Content-Length says."""
    body, too_large = b"", Refused(413, f"the request body is over {limit} bytes")
    async for part in request.stream():
        if len(body := body + part) > limit:
            raise too_large
    return body


async def events(job, request, watch):
    """A job's events until it ends; a client that leaves early marks it gone, so its row leaves
    the batch. A stream's writes find a client gone; otherwise `watch` asks every half second."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.queue.get(), 0.5)
            except asyncio.TimeoutError:
                if watch and await request.is_disconnected():
                    return
                continue
            yield event
            if "delta" not in event:
                return
    finally:
        job.gone = True


def chunk(head, delta=None, finish_reason=None, **extra):
    choice = dict(index=0, delta=delta or {}, logprobs=None, finish_reason=finish_reason)
    body = dict(head, object="chat.completion.chunk", choices=[choice], **extra)
    return f"data: {json.dumps(body)}\n\n"


async def stream(job, request, head):
    """Server-sent chat.completion.chunk events, then [DONE]."""
    yield chunk(head, dict(role="assistant", content=""))
    async for event in events(job, request, watch=False):
        error = json.dumps(dict(error=dict(message=event.get("error"), type="server_error")))
        yield f"data: {error}\n\n" if "error" in event else chunk(head, **event)
    yield "data: [DONE]\n\n"


async def answer(job, request, head):
    """A whole response, from the events a stream sends: both say the same."""
    text, end = dict(reasoning_content="", content=""), {}
    async for event in events(job, request, watch=True):
        for k, v in event.get("delta", {}).items():
            text[k] += v
        end = event
    if "error" in end:
        return Refused(500, end["error"], kind="server_error").respond()
    message = dict(role="assistant", **{k: v for k, v in text.items() if v or k == "content"})
    reason = end.pop("finish_reason", None)
    choice = dict(index=0, message=message, logprobs=None, finish_reason=reason)
    return dict(head, object="chat.completion", choices=[choice], **end)  # usage, r2r


def make_app(worker, tok, engine, args, model):
    def check_key(request: Request):
        got = request.headers.get("authorization", "").encode()
        if args.api_key and not hmac.compare_digest(got, f"Bearer {args.api_key}".encode()):
            why = "a missing or wrong API key: send the header 'Authorization: Bearer KEY'"
            raise Refused(401, why, code="invalid_api_key", kind="authentication_error")

    app, created, v1 = FastAPI(), int(time.time()), [Depends(check_key)]
    internal = Refused(500, "internal error", kind="server_error")
    app.add_exception_handler(Refused, lambda r, e: e.respond())
    # Unknown paths and methods, and whatever else goes wrong: an error object, never a traceback.
    app.add_exception_handler(
        HTTPException, lambda r, e: Refused(e.status_code, e.detail).respond()
    )
    app.add_exception_handler(Exception, lambda r, e: internal.respond())

    @app.get("/health")
    async def health():
        return dict(status="ok")

    @app.get("/v1/models", dependencies=v1)
    async def models():
        card = dict(id=model, object="model", created=created, owned_by="r2r")
        return dict(object="list", data=[card])

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(request: Request):
        try:
            req = ChatRequest.model_validate_json(await read_body(request, args.max_body_bytes))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"])) or None
            status = 400 if first["type"] == "json_invalid" else 422
            raise Refused(status, f"{where or 'body'}: {first['msg']}", where)
        job = make_job(req, tok, engine, args)
        worker.submit(job)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)
        if req.stream:
            return StreamingResponse(stream(job, request, head), media_type="text/event-stream")
        return await answer(job, request, head)

    return app


def main(argv=None):
    args = parse_args(argv)
    # Bound before the models load and before uvicorn starts, so that --port 0 can say its port.
    try:
        sock = socket.create_server((args.host, args.port))
    except (OSError, OverflowError) as e:  # a port in use, or one past 65535
        raise r2r.R2RError(f"cannot listen on {args.host}:{args.port} ({e}): pick another --port")
    device, dtype = r2r.pick_device(args.device, args.dtype)
    slm, llm, tok = r2r.load_pair(args.slm, args.llm, device, dtype, device_map=args.device_map)
    router = r2r.load_router(args.router, slm, tok, device)
    paths = (args.slm, args.llm, args.router)
    engine = r2r.EagerEngine(slm, llm, tok)
    model = "+".join(os.path.basename(os.path.normpath(p)) for p in paths)  # "slm+llm+router"
    # The worker's own tokenizer: one that the event loop uses too can raise "Already borrowed".
    worker = Worker(engine, router, r2r.load_tokenizer(args.slm), args)
    r2r.status(f"engine eager; serving {model} at http://{args.host}:{sock.getsockname()[1]}/v1")
    app = make_app(worker, tok, engine, args, model)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    r2r.run_main(main)
