"""Online recommendation over HTTP: the FastAPI app, its request/response schemas and the service behind
it (DESIGN §1.7, §3). No Ray import: ``ttds_ray.serve_app`` runs :class:`TTDSService` as a Ray Serve
deployment with ``@serve.batch`` over :meth:`TTDSService.rank_batch`; tests and ``ttds-ray serve --no-ray``
run the same app in one process.

Endpoints (OpenAPI at ``/docs``): ``POST /recommend``, ``POST /recommend/batch``, ``POST /items`` (a
cold-start item), ``GET /items/{id}``, ``GET /search``, ``GET /healthz``, ``GET /metadata``, ``GET /``
(the demo page). Every client error is a 4xx JSON ``{"status": ..., "detail": ..., ...}``: unknown ids (404 for a user
or item looked up, 422 for item ids inside a request body; ``unknown_ids`` names them), bad fields (422),
malformed JSON or non-UTF-8 bytes (400), a body over ``max_body_bytes`` (413), an existing item id (409);
a damaged run directory (an unreadable cold-start list) is 503 with the file named.
Reads the run directory (``Recommender.from_run``); writes only ``<run>/cold_start/`` (catalogue.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      model_validator)

from .errors import ArtifactError, CollisionError, TTDSError, UnknownIdError
from .recommender import DuplicateItemError, InvalidRequest, Recommendation, Recommender, RecRequest

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- settings

class ServeSettings(BaseModel):
    """Settings of the online app (the ``args`` of a Serve config, see ``serve_apps/``); unknown keys and
    wrong types are errors naming the key."""
    model_config = ConfigDict(extra="forbid", strict=True)

    run_dir: str = Field(..., description="A finished run directory (its llm stage complete).")
    device: str = Field("cpu", description="torch device of the model: cpu, cuda, cuda:1 ...")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests per @serve.batch call; 1 = batching off.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10, description="Seconds a batch waits to fill.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Request bodies over this get 413.")
    max_batch_requests: int = Field(64, ge=1, le=10_000, description="Requests per POST /recommend/batch.")


# ----------------------------------------------------------------------------- schemas

_Id = Annotated[StrictStr, Field(min_length=1, max_length=256)]


class RecommendIn(BaseModel):
    """A known ``user_id``, or a raw ``history`` of item ids (oldest first); exactly one."""
    model_config = ConfigDict(extra="forbid")

    user_id: Optional[_Id] = Field(None, description="A user of the training log.")
    history: Optional[list[_Id]] = Field(None, description="Item ids, oldest first; longer than the model's "
                                         "history limit keeps the most recent ones (truncated_history).")
    k: StrictInt = Field(10, ge=1, le=100, description="Items to return, 1-100.")
    exclude_seen: StrictBool = Field(True, description="Leave the user's history items out of the results.")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        if self.history is not None and len(self.history) == 0:
            raise ValueError("history is empty: give at least one item id")
        return self

    def to_request(self) -> RecRequest:
        return RecRequest(user_id=self.user_id, history=self.history, k=self.k, exclude_seen=self.exclude_seen)


class ItemOut(BaseModel):
    item_id: str
    title: str
    score: float = Field(description="Summed log-probability (nats) of the item's semantic-ID tokens.")
    semantic_id: str


class RecommendOut(BaseModel):
    items: list[ItemOut]
    user_semantic_id: Optional[str]
    model_version: str
    truncated_history: bool


class ErrorOut(BaseModel):
    status: int
    detail: str
    unknown_ids: Optional[list[str]] = None


class BatchIn(BaseModel):
    """Requests are checked one by one: a malformed one gets its own 422 in ``results``."""
    model_config = ConfigDict(extra="forbid")
    requests: list[dict] = Field(..., min_length=1, description="Up to max_batch_requests RecommendIn bodies.")


class BatchOut(BaseModel):
    """One entry per request, in order: the recommendations, or the error of that request alone."""
    results: list[RecommendOut | ErrorOut]


class NewItemIn(BaseModel):
    """A cold-start item: text is required (its semantic modality); co_items (trained items co-interacted
    with it) add the collaborative modality."""
    model_config = ConfigDict(extra="forbid")

    item_id: _Id
    text: Annotated[StrictStr, Field(min_length=1, max_length=20_000)]
    title: Optional[Annotated[StrictStr, Field(max_length=500)]] = None
    co_items: list[_Id] = Field(default_factory=list, max_length=1000)


class ItemInfo(BaseModel):
    item_id: str
    title: str
    semantic_id: str
    cold_start: bool = False
    modalities: Optional[list[str]] = None


# ----------------------------------------------------------------------------- the service

class ClientError(Exception):
    """An HTTP error answer (4xx; 503 for a damaged run directory) with a message and the unknown ids, if any."""

    def __init__(self, status: int, detail: str, unknown_ids: list | None = None):
        super().__init__(detail)
        self.status, self.detail, self.unknown_ids = status, detail, unknown_ids

    def body(self) -> dict:
        out = {"status": self.status, "detail": self.detail}
        if self.unknown_ids is not None:
            out["unknown_ids"] = [str(i) for i in self.unknown_ids]
        return out


def client_error(e: TTDSError, *, lookup: bool = False) -> ClientError:
    """The HTTP form of a refusal of the library. ``lookup``: the id was the resource asked for (404).
    A damaged run directory (``ArtifactError``) is the server's fault: 503 with the message."""
    if isinstance(e, ArtifactError):
        return ClientError(503, str(e))
    if isinstance(e, UnknownIdError):
        status = 404 if lookup or e.kind == "user" else 422
        return ClientError(status, str(e), e.ids)
    if isinstance(e, (DuplicateItemError, CollisionError)):
        return ClientError(409, str(e))
    return ClientError(422, str(e))


class TTDSService:
    """One loaded run behind the HTTP app: ranking, item lookup, cold-start items, metadata.

    ``recommend_one`` ranks one request; the Ray Serve deployment overrides it with a ``@serve.batch``
    method so concurrent requests share one beam search (``rank_batch``).
    """

    def __init__(self, settings: ServeSettings, recommender: Recommender | None = None):
        self.settings = settings
        self.rec = recommender or Recommender.from_run(settings.run_dir, device=settings.device)
        self.started = time.time()
        self.batch_sizes: Counter[int] = Counter()     # requests per rank_batch call -> calls (in /metadata)

    def rank_batch(self, requests: list[RecRequest]) -> list[Recommendation | TTDSError]:
        """Rank many requests in one call; a bad request yields its error and never fails the others."""
        self.batch_sizes[len(requests)] += 1
        return self.rec.recommend_many(requests)

    async def recommend_one(self, request: RecRequest) -> Recommendation | TTDSError:
        """One request, without batching (the Serve deployment batches it)."""
        return (await asyncio.to_thread(self.rank_batch, [request]))[0]

    @property
    def model_version(self) -> str:
        return f"{Path(self.settings.run_dir).name}@{self.rec.base_sha256[:12]}"

    def response(self, r: Recommendation) -> RecommendOut:
        rec = self.rec
        return RecommendOut(items=[ItemOut(item_id=i, title=rec.titles[int(j)], score=float(s), semantic_id=sid)
                                   for i, j, s, sid in zip(r.item_ids, r.item_idx, r.scores, r.semantic_ids)],
                            user_semantic_id=r.user_semantic_id, model_version=self.model_version,
                            truncated_history=r.truncated_history)

    async def recommend(self, body: RecommendIn) -> RecommendOut:
        try:
            r = await self.recommend_one(body.to_request())
        except TTDSError as e:              # raised (not returned) by the batch path for a bad request
            r = e
        if isinstance(r, TTDSError):
            raise client_error(r)
        return self.response(r)

    def metadata(self) -> dict:
        rec = self.rec
        rec.sync()
        stats = rec.prepared.stats
        return {"dataset": rec.cfg.data.path, "dataset_name": Path(rec.cfg.data.path).name,
                "backbone": rec.cfg.llm.backbone, "finetune": rec.cfg.llm.finetune,
                "id_table_sha256": rec.id_table_sha256(), "base_id_table_sha256": rec.base_sha256,
                "n_items": rec.n_items, "n_trained_items": rec.n_base_items, "n_cold_start_items": len(rec.added),
                "n_users": int(stats.get("n_users", len(rec.user_ids))), "created": _created(rec),
                "model_version": self.model_version, "run_dir": str(rec.run.root),
                "semantic_id_levels": rec.item_table.n_levels, "codebook_size": rec.item_table.codebook_size,
                "max_history": rec.cfg.data.max_history, "max_batch_size": self.settings.max_batch_size,
                "batches": {"calls": sum(self.batch_sizes.values()), "requests": sum(k * v for k, v in
                                                                                      self.batch_sizes.items()),
                            "largest": max(self.batch_sizes, default=0)},
                "started": self.started}


def _created(rec: Recommender) -> str | None:
    """When the run's llm stage was finished (ISO 8601, from its MANIFEST)."""
    try:
        m = json.loads((rec.run.stage_dir("llm") / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return None
    return m.get("finished") or m.get("created")


# ----------------------------------------------------------------------------- the app

class BodyGuard:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, a body that is not UTF-8 gets 400, before
    any route runs (the body is read once and replayed to the app)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, {"status": 413, "detail": f"request body of {int(declared)} bytes "
                                                f"is over the limit of {self.max_bytes} bytes"})
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_json(send, 413, {"status": 413, "detail": f"request body is over the limit of "
                                                    f"{self.max_bytes} bytes"})
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await _send_json(send, 400, {"status": 400, "detail": f"request body is not valid UTF-8 "
                                                f"(byte {e.start}); send JSON encoded as UTF-8"})
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)


async def _send_json(send, status: int, obj: dict) -> None:
    payload = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        msg = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return JSONResponse({"status": 400, "detail": f"malformed JSON: {msg}".rstrip(": ")}, status_code=400)
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return JSONResponse({"status": 422, "detail": "; ".join(parts), "errors": json.loads(json.dumps(
        [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors[:10]], default=str))},
        status_code=422)


def demo_page() -> str:
    """The demo page (``ttds_ray/static/index.html``): plain HTML + JS, no build step."""
    return resources.files("ttds_ray").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(service: TTDSService) -> FastAPI:
    """The FastAPI app over ``service`` (see the module docstring for the endpoints)."""
    s = service.settings
    app = FastAPI(title="ttds-ray recommender", version="0.1.0",
                  description="TTDS generative recommendation: an LLM generates the semantic ID of the next item.")
    app.add_middleware(BodyGuard, max_bytes=s.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.exception_handler(ClientError)
    async def _client_error(_: Request, exc: ClientError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):     # unknown route, wrong method, parse error
        return JSONResponse({"status": exc.status_code, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(demo_page())

    @app.get("/healthz", responses={503: {"model": ErrorOut}})
    async def healthz() -> dict:
        """200 when the model is loaded and the run directory's cold-start list is readable."""
        try:
            service.rec.sync()
        except TTDSError as e:
            raise client_error(e) from None
        return {"status": "ok", "n_items": service.rec.n_items}

    @app.get("/metadata", responses={503: {"model": ErrorOut}})
    async def metadata() -> dict:
        try:
            return service.metadata()
        except TTDSError as e:
            raise client_error(e) from None

    @app.post("/recommend", response_model=RecommendOut, responses={404: {"model": ErrorOut},
                                                                   422: {"model": ErrorOut}})
    async def recommend(body: RecommendIn) -> RecommendOut:
        """Top-k items for a known user or a raw history (item ids, oldest first)."""
        return await service.recommend(body)

    @app.post("/recommend/batch", response_model=BatchOut, responses={413: {"model": ErrorOut}})
    async def recommend_batch(body: BatchIn) -> BatchOut:
        """Many requests in one body; each result is the recommendations or that request's error."""
        if len(body.requests) > s.max_batch_requests:
            raise ClientError(413, f"{len(body.requests)} requests in one batch; the limit is {s.max_batch_requests}")

        async def one(raw: dict):
            try:
                return await service.recommend(RecommendIn.model_validate(raw))
            except ValidationError as e:
                return ErrorOut(status=422, detail="; ".join(
                    f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors()[:10]))
            except ClientError as e:
                return ErrorOut(**e.body())
        return BatchOut(results=list(await asyncio.gather(*(one(r) for r in body.requests))))

    @app.post("/items", status_code=201, response_model=ItemInfo, responses={409: {"model": ErrorOut},
                                                                             422: {"model": ErrorOut}})
    async def add_item(body: NewItemIn) -> ItemInfo:
        """Add a cold-start item: it gets a unique semantic ID from the item tower and is recommendable at once."""
        try:
            out = await asyncio.to_thread(service.rec.add_item, body.item_id, body.text, body.title, body.co_items)
        except TTDSError as e:
            raise client_error(e) from None
        return ItemInfo(**{k: out[k] for k in ("item_id", "title", "semantic_id", "cold_start", "modalities")})

    @app.get("/items/{item_id:path}", response_model=ItemInfo, responses={404: {"model": ErrorOut}})
    async def get_item(item_id: str) -> ItemInfo:
        try:
            out = service.rec.item(item_id)
        except TTDSError as e:
            raise client_error(e, lookup=True) from None
        return ItemInfo(**{k: out[k] for k in ("item_id", "title", "semantic_id", "cold_start", "modalities")})

    @app.get("/search")
    async def search(q: Annotated[str, Query(max_length=200)] = "",
                     limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
        """Items whose title contains every word of ``q`` (case-insensitive)."""
        try:
            return {"items": service.rec.search(q, limit)}
        except TTDSError as e:
            raise client_error(e) from None

    return app
