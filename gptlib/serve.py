"""``gptlib serve``: one checkpoint behind HTTP (FastAPI, served by uvicorn; ``pip install -e ".[serve]"``).

- ``POST /generate`` takes a ``prompt`` to continue, or an ``instruction`` (and optional ``input``) to wrap in the
  prompt template, with the sampling settings of ``gptlib generate``. It returns JSON with the text and token counts,
  or, with ``"stream": true``, server-sent events: one ``data: {"text": ...}`` per piece of text as it is produced,
  then ``data: {"done": true, ...}`` with the counts.
- ``GET /health`` names the model and its tokenizer.

Requests are checked before any work (pydantic): unknown fields, out-of-range numbers, a missing or doubled prompt,
and prompts longer than the model's context get a 4xx status with a readable message.

Greedy requests that arrive together are answered in one batch (:func:`gptlib.generate_batch`, whose greedy
answers equal one-by-one generation); a sampled request runs alone, so its ``seed`` gives exactly what
``gptlib generate --seed`` gives.
"""

import asyncio
import json
from dataclasses import dataclass, field

from .errors import UserInputError
from .generate import SamplingSettings, generate, generate_batch, stream
from .instructions import format_prompt

MAX_NEW_TOKENS = 1024  # per request


def require_serving():
    """Import fastapi, uvicorn and pydantic, or fail with how to install them."""
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserInputError('gptlib serve needs fastapi and uvicorn: pip install -e ".[serve]"') from None


def request_model():
    """The pydantic model of a /generate request (built lazily: pydantic is an optional dependency)."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str | None = Field(None, description="text to continue")
        instruction: str | None = Field(None, description="an instruction, wrapped in the prompt template")
        input: str = Field("", description="the template's optional input section (with instruction only)")
        max_new_tokens: int = Field(100, ge=1, le=MAX_NEW_TOKENS)
        temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 is greedy")
        top_k: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
        seed: int | None = Field(None, ge=0, lt=2 ** 63)
        stream: bool = False

        @model_validator(mode="after")
        def one_prompt(self):
            if (self.prompt is None) == (self.instruction is None):
                raise ValueError("give exactly one of 'prompt' (text to continue) or 'instruction'")
            if self.input and self.instruction is None:
                raise ValueError("'input' goes with 'instruction', not with 'prompt'")
            if not (self.prompt if self.prompt is not None else self.instruction).strip():
                raise ValueError("the prompt is empty")
            return self

        def text(self) -> str:
            return self.prompt if self.prompt is not None else format_prompt(self.instruction, self.input)

        def settings(self) -> SamplingSettings:
            return SamplingSettings(self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    return GenerateRequest


@dataclass
class _Job:
    ids: list[int]
    max_new_tokens: int
    settings: SamplingSettings
    seed: int | None
    done: asyncio.Future | None = field(repr=False, default=None)


class Batcher:
    """Collects requests for a few milliseconds and answers greedy ones with the same settings in one batch.

    One worker runs the model at a time (a 2-core CPU gains nothing from two forward passes at once, and the
    model's KV caches are per call), in a thread, so the event loop keeps accepting requests meanwhile.
    """

    def __init__(self, model, max_batch: int = 32, wait_seconds: float = 0.005):
        self.model, self.max_batch, self.wait_seconds = model, max_batch, wait_seconds
        self.queue: asyncio.Queue | None = None
        self.lock = asyncio.Lock()  # streams and batches take turns on the model
        self.largest_batch = 0  # for /health (and the tests): did requests ever share a batch?

    async def submit(self, ids: list[int], max_new_tokens: int, settings: SamplingSettings, seed) -> list[int]:
        job = _Job(ids, max_new_tokens, settings, seed, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.done

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        while True:
            jobs = [await self.queue.get()]
            await asyncio.sleep(self.wait_seconds)  # let requests that arrive together share the batch
            while not self.queue.empty() and len(jobs) < self.max_batch:
                jobs.append(self.queue.get_nowait())
            for group in self._groups(jobs):
                await self._answer(group)

    @staticmethod
    def _groups(jobs: list[_Job]) -> list[list[_Job]]:
        greedy: dict[tuple, list[_Job]] = {}
        groups = []
        for job in jobs:
            if job.settings.temperature == 0:
                key = (job.settings.repetition_penalty,)
                if key not in greedy:
                    greedy[key] = []
                    groups.append(greedy[key])
                greedy[key].append(job)
            else:
                groups.append([job])  # sampled: alone, so its seed means what it means for `gptlib generate`
        return groups

    async def _answer(self, group: list[_Job]) -> None:
        longest = max(job.max_new_tokens for job in group)
        try:
            async with self.lock:
                if len(group) == 1:  # alone: exactly what `gptlib generate` gives, seed included
                    job = group[0]
                    outputs = [await asyncio.to_thread(generate, self.model, job.ids, longest, job.settings,
                                                       seed=job.seed)]
                else:
                    outputs = await asyncio.to_thread(generate_batch, self.model, [job.ids for job in group],
                                                      longest, group[0].settings)
            self.largest_batch = max(self.largest_batch, len(group))
            for job, ids in zip(group, outputs):
                job.done.set_result(ids[:job.max_new_tokens])  # greedy tokens do not depend on the limit
        except Exception as exc:  # noqa: BLE001 - handed to each waiting request, which answers 500
            for job in group:
                if not job.done.done():
                    job.done.set_exception(exc)


def create_app(model, checkpoint: str = "", max_batch: int = 32):
    """The FastAPI app serving ``model`` (a loaded :class:`~gptlib.GPTModel`)."""
    require_serving()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    model.eval()
    tokenizer = model.tokenizer
    batcher = Batcher(model, max_batch)
    GenerateRequest = request_model()

    @asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title="gptlib serve", lifespan=lifespan,
                  description="Generate text with a gptlib checkpoint. POST /generate; GET /health.")
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def readable_errors(request: Request, exc: RequestValidationError):
        problems = []
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                at = error.get("loc", ("body", "?"))[-1]
                problems.append(f"the request body is not valid JSON (at character {at}): "
                                f"{error.get('ctx', {}).get('error', 'invalid JSON')}")
                continue
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "request body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse(status_code=422, content={"error": "; ".join(problems), "details": problems})

    @app.exception_handler(HTTPException)
    async def http_errors(request: Request, exc: HTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": exc.detail})

    @app.get("/health")
    async def health():
        return {"status": "ok", "checkpoint": checkpoint, "parameters": model.num_parameters(),
                "context_length": model.config.context_length,
                "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size},
                "device": str(model.device), "largest_batch": batcher.largest_batch}

    @app.post("/generate")
    async def generate(body: GenerateRequest):
        ids = tokenizer.encode(body.text())
        limit = model.config.context_length
        if len(ids) > limit:
            raise HTTPException(413, f"the prompt is {len(ids)} tokens; this model reads at most {limit}: "
                                     "shorten it")
        try:
            settings = body.settings()
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        counts = {"prompt_tokens": len(ids)}
        if body.stream:
            return StreamingResponse(_events(ids, body, settings, counts), media_type="text/event-stream")
        new = await batcher.submit(ids, body.max_new_tokens, settings, body.seed)
        return {"text": tokenizer.decode(new), **counts, "completion_tokens": len(new),
                "finish_reason": "length" if len(new) == body.max_new_tokens else "stop"}

    async def _events(ids, body, settings, counts):
        """Server-sent events: each piece of text as soon as its bytes make whole characters."""
        tokens = stream(model, ids, body.max_new_tokens, settings, seed=body.seed)
        pending, n = b"", 0
        async with batcher.lock:
            while True:
                token = await asyncio.to_thread(next, tokens, None)
                if token is None:
                    break
                n += 1
                pending += tokenizer.token_bytes(token)
                try:
                    piece = pending.decode("utf-8")
                except UnicodeDecodeError:
                    continue  # a character split across tokens: wait for its other bytes
                pending = b""
                yield f"data: {json.dumps({'text': piece})}\n\n"
        if pending:
            yield f"data: {json.dumps({'text': pending.decode('utf-8', errors='replace')})}\n\n"
        done = {"done": True, **counts, "completion_tokens": n,
                "finish_reason": "length" if n == body.max_new_tokens else "stop"}
        yield f"data: {json.dumps(done)}\n\n"

    return app


def serve(model, checkpoint: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until Ctrl-C."""
    require_serving()
    import uvicorn
    uvicorn.run(create_app(model, checkpoint), host=host, port=port, log_level=log_level)
