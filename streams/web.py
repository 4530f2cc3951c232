"""HTTP views on the worker's web server: interest lookups, learner state, health, metrics.

``/health`` is 503 while tables recover, while no bootstrap broker answers
(streams/runtime/gauges.py ``BrokerProbe``) and while a consumer partition is stalled
(streams/runtime/watchdog.py); ``GET /ads/{ad_id}/strategy`` shows the
learner counts the decision stage reads for an ad.

``GET /users/{user_id}/interest`` (with the user's behaviour sequence, newest first,
when the sequence table is on) takes the raw user id (the one apps key
events by): the raw id picks the partition, so Faust's table routing forwards
the request to the worker that owns it, which looks the user up by pseudonym
(adpulse/core/privacy.py). ``GET /pseudonyms/{pseudonym}/interest`` looks up a
pseudonym (as logs and ctr-feedback show it) in the partitions this worker
holds: a pseudonym does not tell its partition, so ask each worker.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from faust import web

from adpulse.core.privacy import API_TOKEN_HELP, bearer_ok, load_api_token
from schemas.openapi import dumps
from scoring import sequence
from scoring.features import InterestParams, decode_all, describe
from scoring.itemspace import corrections
from scoring.strategy.state import decode_ad
from streams.runtime import watchdog
from streams.runtime.consumer import FaustConsumerView
from streams.runtime.gauges import PROBE_S, BrokerProbe

if TYPE_CHECKING:
    from streams.wiring import Wiring


def wire(w: Wiring) -> None:
    app, table = w.app, w.interest
    params = InterestParams.from_settings(w.settings)
    probe = BrokerProbe(w.settings, w.metrics)
    stall = watchdog.StallWatchdog(stall_s=w.settings.stall_s)
    view = FaustConsumerView(app)

    token = load_api_token(w.settings)

    def refused(view: web.View, request: web.Request) -> web.Response | None:
        """401 unless the request carries the API token (user data: never open)."""
        if bearer_ok(token, request.headers.get("Authorization")):
            return None
        return view.json({"error": API_TOKEN_HELP}, status=401, headers=_CHALLENGE)

    @app.page("/users/{user_id}/interest")
    @app.table_route(table=table, match_info="user_id")
    async def interest(self: web.View, request: web.Request, user_id: str) -> web.Response:
        # A non-owner has forwarded the request with its headers: the owner checks them.
        no = refused(self, request)
        if no is not None:
            return no
        body, status = _lookup(w.pseudonyms(user_id), {"user_id": user_id})
        return self.json(body, status=status)

    @app.page("/pseudonyms/{pseudonym}/interest")
    async def interest_by_pseudonym(
        self: web.View, request: web.Request, pseudonym: str
    ) -> web.Response:
        no = refused(self, request)
        if no is not None:
            return no
        body, status = _lookup(pseudonym, {})
        return self.json(body, status=status)

    def _lookup(pseudonym: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        body["pseudonym"] = pseudonym
        raw = table.data.get(pseudonym.encode())
        if raw is None:
            return {**body, "error": "unknown user"}, 404
        states, _, items = decode_all([raw], params)
        if w.items is None:
            body = {**body, **describe(states[0], _now_ms(), params)}
        else:  # with item text, the vectors shown are the ones decisions read (itemspace.py)
            vectors = w.items.get()
            extra = corrections(items, vectors, params.dim)[0]
            got = 0 if vectors is None else vectors.vectors(items.item, items.cat)[0].sum()
            embedded = int(got)
            body = {**body, **describe(states[0], _now_ms(), params, extra),
                    "items": len(items.item), "items_embedded": embedded}  # fmt: skip
        if w.sequence is not None:
            seq = sequence.decode_sequences([w.sequence.data.get(pseudonym.encode())])
            body["sequence"] = sequence.describe(seq.of(0))
        return body, 200

    @app.page("/health")
    async def health(self: web.View, request: web.Request) -> web.Response:
        recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        if not probe.connected:
            return self.json({"status": "broker unreachable"}, status=503)
        if not w.catalog.ready:
            return self.json({"status": "loading catalog"}, status=503)
        if not w.strategy.ready:
            return self.json({"status": "loading learner state"}, status=503)
        if w.items is not None and not w.items.mirror.ready:
            return self.json({"status": "loading item catalog"}, status=503)
        if stall.stalled:
            return self.json({"status": "consumer stalled", "partitions": len(stall.stalled)},
                             status=503)  # fmt: skip
        status = 200 if recovered else 503
        return self.json({"status": "ok" if recovered else "recovering"}, status=status)

    @app.timer(PROBE_S)
    async def probe_broker() -> None:
        await probe.run()

    @app.timer(watchdog.TICK_S)
    async def watch_consumer() -> None:
        if w.settings.stall_s <= 0:
            return
        if not view.eligible():
            stall.reset(0.0)
        else:
            before = stall.stalls
            await watchdog.check(stall, view)
            w.metrics.consumer_stalls.inc(stall.stalls - before)
        w.metrics.consumer_stalled.set(len(stall.stalled))

    @app.page("/ads/{ad_id}/strategy")
    async def strategy(self: web.View, request: web.Request, ad_id: str) -> web.Response:
        """The learner state the decision stage reads for one ad (every worker holds it)."""
        raw = w.strategy.get_many([ad_id.encode()])[0]
        if raw is None:
            return self.json({"ad_id": ad_id, "error": "no labels for this ad"}, status=404)
        st = decode_ad(raw)
        segments = {str(k): {"shows": n, "clicks": c} for k, (n, c) in st.segments.items()}
        body = {"ad_id": ad_id, "shows": st.shows, "clicks": st.clicks, "segments": segments}
        return self.json(body)

    @app.page("/openapi.json")
    async def openapi_doc(self: web.View, request: web.Request) -> web.Response:
        """The HTTP API (schemas/openapi.py: built from the topic contracts)."""
        return self.bytes(_OPENAPI, content_type="application/json")

    @app.page("/metrics")
    async def metrics(self: web.View, request: web.Request) -> web.Response:
        return self.bytes(w.metrics.exposition(), content_type="text/plain; version=0.0.4")


_OPENAPI = dumps().encode()
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="adpulse"'}


def _now_ms() -> int:
    return int(time.time() * 1000)
