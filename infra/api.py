"""The HTTP API over the read models (``backbeat serve``): a FastAPI app made by :func:`create_app`.

Every endpoint is a thin shell over the read function the CLI uses (one of each):
:func:`projections.recommendations.read_recommendations` (``backbeat recommend``),
:func:`projections.feature_store.read_features` (``backbeat features``),
:mod:`projections.catalog` (tracks by id and search), :func:`sagas.readmodel.read_saga`. Each
read opens the DuckDB file read-only through :func:`projections.store.reader` (the turnstile), so
the API answers while runners write; a read waits at most ``read_timeout_s`` for a batch in flight.

Errors are RFC 9457 problem details (``application/problem+json``: ``type``, ``title``,
``status``, ``detail``, ``instance``): 404 for an unknown user, track, saga or route, 400 for a
bad ``as_of``, 422 for a parameter FastAPI rejects (with ``errors``), 503 (with ``Retry-After``)
when there is no DuckDB file or read model yet, or the file stayed busy. ``/health`` (the
readiness document of every backbeat process, :mod:`infra.ops`) and ``/metrics`` (Prometheus
text: request counter and latency histogram per route template, plus :mod:`infra.metrics`'
process metrics) are there too; ``/docs`` and ``/openapi.json`` describe it all. The page is
``docs/http-api.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from infra import metrics as metrics_mod
from infra import ops
from infra.errors import BackbeatError
from infra.settings import Settings

PROBLEM_JSON = "application/problem+json"
#: The ``type`` of the problems this API returns: ``urn:backbeat:problem:<slug>``.
PROBLEM_TYPE = "urn:backbeat:problem:"
#: Seconds a 503 asks the client to wait (``Retry-After``).
RETRY_AFTER_S = 2


def _problem(request: Request, status: int, slug: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem details response for ``request``."""
    instance = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    body = {
        "type": PROBLEM_TYPE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({**body, **extra}, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _classify(exc: BackbeatError) -> tuple[int, str, str]:
    """``(status, slug, title)`` of a backbeat error raised by a read function."""
    from infra.cli_entitlements import BadTimeError as BadAtError
    from projections.availability import AvailabilityUnreadableError, UnknownTerritoryError
    from projections.catalog import NoCatalogError, UnknownTrackError
    from projections.feature_store import BadTimeError, NoFeatureStoreError, UnknownEntityError
    from projections.recommendations import NoRecommendationsModelError, UnknownUserError
    from projections.store import DatabaseBusyError, NoReadModelsError
    from sagas.access import NoEntitlementsReadModelError
    from sagas.readmodel import NoSagasReadModelError, UnknownSagaError

    if isinstance(exc, DatabaseBusyError):
        return 503, "read-models-busy", "The read models stayed busy"
    if isinstance(
        exc, NoReadModelsError | NoRecommendationsModelError | NoFeatureStoreError | NoCatalogError
    ) or isinstance(exc, NoSagasReadModelError | AvailabilityUnreadableError):
        return 503, "read-model-missing", "The read model does not exist yet"
    if isinstance(exc, UnknownUserError | UnknownEntityError):
        return 404, "unknown-user", "Unknown user"
    if isinstance(exc, UnknownTrackError):
        return 404, "unknown-track", "Unknown track"
    if isinstance(exc, UnknownSagaError):
        return 404, "unknown-saga", "Unknown saga"
    if isinstance(exc, BadTimeError | BadAtError):
        return 400, "bad-time", "Bad point in time"
    if isinstance(exc, UnknownTerritoryError):
        return 400, "unknown-territory", "Unknown territory"
    if isinstance(exc, NoEntitlementsReadModelError):
        return 503, "read-model-missing", "The read model does not exist yet"
    return 500, "internal", "Internal error"


def _jsonable(value: Any) -> Any:
    """``value`` with naive-UTC ``datetime`` values as ISO-8601 strings ending in ``Z``."""
    from infra.cli_features import iso_utc

    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _metrics(app: FastAPI) -> CollectorRegistry:
    """A registry of the app's own metrics, filled by a middleware: ``backbeat_http_requests_total``
    (counter; labels method, route template, status) and ``backbeat_http_request_duration_seconds``
    (histogram; labels method, route template). Unmatched paths count as route ``<unmatched>``."""
    registry = CollectorRegistry()
    requests = Counter(
        "backbeat_http_requests", "HTTP requests served", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "backbeat_http_request_duration_seconds",
        "Time to serve an HTTP request, in seconds",
        ["method", "route"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "<unmatched>")
            requests.labels(request.method, route, str(status)).inc()
            latency.labels(request.method, route).observe(time.perf_counter() - start)

    return registry


def create_app(settings: Settings, *, read_timeout_s: float = 10.0) -> FastAPI:
    """The API over the read models in ``settings.duckdb_path``. ``read_timeout_s`` bounds each
    read's wait for a runner's batch in flight (then 503). The DuckDB file may appear later: it
    is looked for at each request."""
    from infra.cli_features import to_json as features_json
    from infra.cli_recommend import to_json as recommendations_json
    from projections import catalog
    from projections.feature_store import USER_TABLE, parse_as_of, read_features
    from projections.recommendations import TOP_N, read_recommendations
    from sagas.readmodel import read_saga

    app = FastAPI(
        title="backbeat",
        summary="Read models of the backbeat streaming backbone over HTTP.",
        description=(
            "Reads DuckDB read models while the projection runners write. Errors are RFC 9457 "
            "problem details (application/problem+json)."
        ),
        version="0.1.0",
    )
    registry = _metrics(app)
    problem = {"content": {PROBLEM_JSON: {}}}

    @app.exception_handler(BackbeatError)
    async def backbeat_error(request: Request, exc: BackbeatError) -> JSONResponse:
        status, slug, title = _classify(exc)
        return _problem(request, status, slug, title, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return _problem(request, 422, "invalid-request", "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        from http import HTTPStatus

        title = HTTPStatus(exc.status_code).phrase
        slug = title.lower().replace(" ", "-")
        return _problem(request, exc.status_code, slug, title, str(exc.detail))

    responses: dict[int | str, dict[str, Any]] = {
        404: {"description": "Unknown id (problem details)", **problem},
        503: {"description": "No read model yet, or busy (problem details)", **problem},
    }

    def observe() -> metrics_mod.Observation:
        present = settings.duckdb_path.exists()
        return metrics_mod.Observation(ready=True, detail={"duckdb": "present" if present else "absent"})

    metrics_mod.register("api", observe)

    @app.get("/health", tags=["operations"])
    def health() -> JSONResponse:
        """Readiness, the same document every backbeat process serves (:func:`infra.ops.health`):
        ``{"status": "ready", "process", "pid", "components": {"api": {"ready": true, "duckdb":
        "present" | "absent"}}}``. The API is ready as soon as it answers; whether the read-model
        file exists yet is in ``duckdb`` (reads answer 503 until it does)."""
        status, body = ops.health()
        return JSONResponse(body, status_code=status)

    @app.get("/health/live", tags=["operations"])
    def live() -> dict[str, Any]:
        """Liveness: ``{"status": "alive", "pid"}`` while the server answers."""
        return {"status": "alive", "pid": os.getpid()}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text: the request counter and latency histogram, then the process metrics
        every backbeat process exports (:mod:`infra.metrics`: ``backbeat_up``, ``process_*``)."""
        body = generate_latest(registry) + generate_latest(metrics_mod.REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/users/{user_id}/recommendations", tags=["users"], responses=responses)
    def recommendations(
        user_id: str,
        n: Annotated[int, Query(ge=1, le=500, description="At most this many items.")] = TOP_N,
        territory: Annotated[
            str | None,
            Query(
                min_length=2,
                max_length=2,
                description="ISO country served (default: the user's latest player listen's, else US).",
            ),
        ] = None,
    ) -> Response:
        """The user's "Made for You" list (``backbeat recommend USER --json``): ``{user_id,
        experiment_id, variant, model, generated_at, computed_at, territory, withheld, items:
        [{rank, track_id, track, artist, score, source}]}``; tracks not playable in ``territory``
        now (withdrawn or unlicensed) are never listed; 400 for a territory not tracked."""
        recs = read_recommendations(settings, user_id, n, timeout_s=read_timeout_s, territory=territory)
        return Response(recommendations_json(recs), media_type="application/json")

    @app.get("/users/{user_id}/features", tags=["users"], responses=responses)
    def features(
        user_id: str,
        as_of: Annotated[
            str | None,
            Query(
                description="Point in time (ISO-8601; no offset = UTC): values known then. Default latest."
            ),
        ] = None,
    ) -> Response:
        """The user's feature values per window size (``backbeat features USER --json``):
        ``{user_id, as_of, features: [{feature_set, window_start, window_end, window_size_ms,
        window_step_ms, plays, …, top_artists: [{artist_id, affinity}]}]}``; 400 for a bad
        ``as_of``."""
        when = parse_as_of(as_of) if as_of is not None else None
        rows = read_features(settings, USER_TABLE, user_id, when, timeout_s=read_timeout_s)
        return Response(features_json(user_id, when, rows), media_type="application/json")

    @app.get("/users/{user_id}/entitlements", tags=["users"], responses=responses)
    def entitlements(
        user_id: str,
        at: Annotated[
            str | None,
            Query(
                description="Instant to ask about (ISO-8601; no offset = UTC). Default: the business "
                "clock's now, else the wall clock."
            ),
        ] = None,
    ) -> dict[str, Any]:
        """May the user play premium content (``backbeat entitlements USER --json``, issue 17):
        ``{user_id, at, clock, premium, until, why, entitlements: [{entitlement_id, kind,
        subscription_id, valid_from, valid_until, state, revoke_reason, …}]}``; 400 for a bad
        ``at``; 503 before the read model exists. A user with none answers ``premium: false``."""
        from infra.cli_entitlements import parse_at
        from sagas.access import read_answer

        doc = read_answer(settings, user_id, parse_at(at) if at else None, timeout_s=read_timeout_s)
        doc["entitlements"] = [{k: v for k, v in r.items() if k != "covers"} for r in doc["entitlements"]]
        return _jsonable(doc)

    @app.get("/tracks/search", tags=["tracks"], responses=responses)
    def search(
        q: Annotated[str, Query(min_length=1, max_length=200, description="Words to find.")],
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> dict[str, Any]:
        """Tracks whose name, artist or album contain every word of ``q``, best first (ranking
        in :mod:`projections.catalog`): ``{query, tokens, items: [{track_id, name, artist,
        album_name, popularity, genre, duration_ms, score}]}``."""
        items = catalog.search_tracks(settings, q, limit, timeout_s=read_timeout_s)
        return {"query": q, "tokens": catalog.tokens(q), "items": _jsonable(items)}

    @app.get("/tracks/{track_id}", tags=["tracks"], responses=responses)
    def track(track_id: str) -> dict[str, Any]:
        """One track of the catalog read model, every column (``published_at`` ISO UTC)."""
        return _jsonable(catalog.read_track(settings, track_id, timeout_s=read_timeout_s))

    @app.get("/sagas/{saga_id}", tags=["sagas"], responses=responses)
    def saga(saga_id: str) -> dict[str, Any]:
        """A saga by id or business id (subscription or order id): ``{saga: {saga_id, kind,
        state, business_id, user_id, payment_id, amount_minor, currency, reason, requested_at,
        started_at, ended_at, duration_ms, retries, version}, events: [{version, event,
        recorded_at, step, detail}], order_lines: [{order_id, sku, quantity}]}``."""
        return _jsonable(read_saga(settings, saga_id, timeout_s=read_timeout_s))

    return app


__all__ = ["PROBLEM_JSON", "PROBLEM_TYPE", "create_app"]
