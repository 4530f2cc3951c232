"""HTTP views on the worker's web server: interest lookups, health and metrics.

``GET /users/{user_id}/interest`` is answered by whichever worker owns the
user's partition (Faust's table routing forwards the request there), so an
operator can ask any worker.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from faust import web

from scoring.features import InterestParams, decode_states, describe

if TYPE_CHECKING:
    from streams.app import Wiring


def wire(w: Wiring) -> None:
    app, table = w.app, w.interest
    params = InterestParams.from_settings(w.settings)

    @app.page("/users/{user_id}/interest")
    @app.table_route(table=table, match_info="user_id")
    async def interest(self: web.View, request: web.Request, user_id: str) -> web.Response:
        raw = table.data.get(user_id.encode())
        if raw is None:
            return self.json({"user_id": user_id, "error": "unknown user"}, status=404)
        state = decode_states([raw], params)[0]
        body: dict[str, Any] = {"user_id": user_id, **describe(state, _now_ms(), params)}
        return self.json(body)

    @app.page("/health")
    async def health(self: web.View, request: web.Request) -> web.Response:
        recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        status = 200 if recovered else 503
        return self.json({"status": "ok" if recovered else "recovering"}, status=status)

    @app.page("/metrics")
    async def metrics(self: web.View, request: web.Request) -> web.Response:
        return self.bytes(w.metrics.exposition(), content_type="text/plain; version=0.0.4")


def _now_ms() -> int:
    return int(time.time() * 1000)
