"""The OpenAI-compatible app: routes, the model loading in the background (/health answers 503 until it is
ready), the engine stopped at shutdown. `create_app(load, name)` takes a function that builds the engine."""

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from modelcode.serving import errors
from modelcode.serving.chat import create_chat_completion
from modelcode.serving.completions import create_completion
from modelcode.serving.errors import APIError
from modelcode.serving.metrics import Metrics
from modelcode.serving.middleware import APIKey, BodyLimit, CountRequests, unless_disconnected
from modelcode.serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from modelcode.tokenization import read_chat_template

log = logging.getLogger("modelcode.serving")
PAGE = Path(__file__).parent / "static" / "chat.html"
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}


class Server:
    """What the routes share: the engine once loaded, the served model's name, the metrics."""

    def __init__(self, load: Callable, model_name: str, on_load_error: Callable | None = None):
        self.load, self.model_name, self.on_load_error = load, model_name, on_load_error
        self.engine = None
        self.created = int(time.time())
        self.metrics = Metrics(lambda: self.engine)

    async def start(self) -> None:
        try:
            engine = await asyncio.to_thread(self.load)
            if engine.lm.tokenizer is None:
                raise ValueError(f"{engine.lm.path} has no tokenizer files: the server needs a tokenizer")
        except Exception as e:
            log.error("could not load %s: %s", self.model_name, e)
            if self.on_load_error is not None:
                self.on_load_error(e)
            return
        engine.start()
        self.engine = engine
        log.info("%s is ready: context %d tokens", self.model_name, self.max_seq_len)

    @property
    def lm(self):
        return self.engine.lm

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def vocab_size(self) -> int:
        """Ids both the model and the tokenizer know."""
        return min(self.lm.config.vocab_size, self.lm.tokenizer.vocab_size)

    def ready(self, model: str | None = None) -> "Server":
        if self.engine is None:
            raise APIError(503, f"{self.model_name} is still loading: retry when /health answers 200")
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves {self.model_name!r} "
                           "(see /v1/models)", "model", "model_not_found")
        return self

    def card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, root=str(self.lm.path),
                         max_model_len=self.max_seq_len)


def create_app(load: Callable, model_name: str, api_key: str | None = None, max_body_bytes: int = 8 << 20,
               on_load_error: Callable | None = None) -> FastAPI:
    """load() -> Engine runs in a thread at startup; on_load_error(e) is told if it fails."""
    server = Server(load, model_name, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(server.start())
        yield
        loading.cancel()
        if server.engine is not None:
            server.engine.shutdown()

    app = FastAPI(title="modelcode", summary="An OpenAI-compatible server on modelcode's engine",
                  lifespan=lifespan, responses=ERRORS)
    app.state.server = server
    errors.install(app)
    add_routes(app, server)
    endpoints = {route.path for route in app.routes}
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(APIKey, key=api_key)
    app.add_middleware(CountRequests, counter=server.metrics.requests, endpoints=endpoints)
    return app


def add_routes(app: FastAPI, server: Server) -> None:
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    def health() -> dict:
        server.ready()
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> ModelList:
        return ModelList(data=[server.ready().card()])

    @app.get("/v1/models/{model}")
    def model(model: str) -> ModelCard:
        return server.ready(model).card()

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(req: CompletionRequest, request: Request):
        return await unless_disconnected(request, create_completion(req, server.ready(req.model)))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await unless_disconnected(request, create_chat_completion(req, server.ready(req.model)))

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        tok = server.ready(req.model).lm.tokenizer
        ids = tok.encode(req.prompt, bos=req.add_special_tokens and tok.add_bos)
        return TokenizeResponse(count=len(ids), max_model_len=server.max_seq_len, tokens=ids)

    @app.post("/detokenize")
    def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        server.ready(req.model)
        if req.tokens and max(req.tokens) >= server.vocab_size:
            raise APIError(400, f"token id {max(req.tokens)} is outside the vocabulary (ids go from 0 to "
                           f"{server.vocab_size - 1})", "tokens", "invalid_value")
        return DetokenizeResponse(prompt=server.lm.tokenizer.decode(req.tokens))

    @app.get("/tokenizer_info")
    def tokenizer_info() -> dict:
        """What lm-eval's remote tokenizer reads (as vLLM's /tokenizer_info)."""
        tok = server.ready().lm.tokenizer
        text = {i: t for t, i in tok.special_tokens.items()}
        name = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
        return {"tokenizer_class": type(tok).__name__, "model_max_length": server.max_seq_len,
                "add_bos_token": tok.add_bos, "chat_template": read_chat_template(server.lm.path),
                **{k: None if i is None else text.get(i, tok.decode([i])) for k, i in name.items()}}
