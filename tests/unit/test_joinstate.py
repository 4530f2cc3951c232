"""The click join's state machine (scoring/joinstate.py), without a broker."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas import first_error
from scoring import joinstate as js

P = js.JoinParams(window_ms=1000, conversion_ms=5000, grace_ms=100)


def dec(did: str, off: int, ts: int = 1000, **kw: Any) -> js.Decision:
    return js.Decision(did, off, "u1", "ad1", ts, 0.5, "greedy", 0.1, "v1", "home", **kw)


def click(did: str, off: int, ts: int) -> js.Event:
    return js.Event(off, "u1", ts, did)


def run(state: dict[str, js.Pending | None], ds: list[js.Decision], evs: list[js.Event]) -> js.Step:
    return js.apply_batch(state, ds, evs, P)


def test_click_inside_window_labels_one_at_once_and_schema_valid() -> None:
    state: dict[str, js.Pending | None] = {}
    out = run(state, [dec("d1", 0)], [click("d1", 0, 1500)])
    assert [lab.clicked for lab in out.labels] == [1]
    assert first_error("ctr-feedback", msgspec.to_builtins(out.labels[0])) is None
    assert js.close_due(state, 10_000, P).labels == []  # never a second label


def test_no_click_labels_zero_once_watermark_passes_window_end() -> None:
    state: dict[str, js.Pending | None] = {}
    run(state, [dec("d1", 0)], [])
    assert js.close_due(state, 2000, P).labels == []  # at window end: not yet
    zero = js.close_due(state, 2001, P).labels
    assert [lab.clicked for lab in zero] == [0]
    assert zero[0].label_ts == 2000
    assert first_error("ctr-feedback", msgspec.to_builtins(zero[0])) is None
    assert js.close_due(state, 2002, P).labels == []


def test_click_after_zero_label_is_late_and_not_emitted() -> None:
    state: dict[str, js.Pending | None] = {}
    run(state, [dec("d1", 0)], [])
    js.close_due(state, 2001, P)
    out = run(state, [], [click("d1", 5, 1900), click("d1", 6, 1950)])
    assert out.labels == [] and out.late_clicks == 2


def test_click_stamped_after_window_is_late() -> None:
    state: dict[str, js.Pending | None] = {}
    out = run(state, [dec("d1", 0)], [click("d1", 0, 2500)])
    assert out.labels == [] and out.late_clicks == 1


def test_redelivered_batch_changes_nothing_and_emits_nothing() -> None:
    state: dict[str, js.Pending | None] = {}
    run(state, [dec("d1", 3)], [click("d1", 7, 1200)])
    before = js.encode(state["d1"])  # type: ignore[arg-type]
    again = run(state, [dec("d1", 3)], [click("d1", 7, 1200)])
    assert again.labels == [] and again.late_clicks == 0
    assert js.encode(state["d1"]) == before  # type: ignore[arg-type]


def test_click_before_its_decision_is_held_and_labels_one_when_decision_comes() -> None:
    state: dict[str, js.Pending | None] = {}
    assert run(state, [], [click("d1", 0, 1200)]).labels == []
    out = run(state, [dec("d1", 0)], [])
    assert [(lab.clicked, lab.click_ts) for lab in out.labels] == [(1, 1200)]


def test_purchase_of_same_category_after_click_converts_once() -> None:
    state: dict[str, js.Pending | None] = {}
    run(state, [dec("d1", 0, category_id=7, item_id=70)], [click("d1", 0, 1200)])
    buy = js.Event(1, "u1", 3000, "", item_id=99, category_id=7)
    out = run(state, [], [buy, js.Event(2, "u1", 3100, "", item_id=70, category_id=1)])
    assert [(lab.clicked, lab.converted) for lab in out.labels] == [(1, 1)]
    assert first_error("ctr-feedback", msgspec.to_builtins(out.labels[0])) is None


def test_labelled_records_expire_after_windows_plus_grace() -> None:
    state: dict[str, js.Pending | None] = {}
    run(state, [dec("d1", 0), dec("d2", 1)], [click("d1", 0, 1200)])
    js.close_due(state, 2001, P)  # d2 -> zero
    assert js.close_due(state, 2101, P).deleted == {"d2"}
    out = js.close_due(state, 1200 + 5000 + 101, P)
    assert out.deleted == {"d1", "d2"} and out.labels == []


def test_record_roundtrips_through_msgpack() -> None:
    state: dict[str, js.Pending | None] = {}
    run(state, [dec("d1", 0, campaign_id="c", arm="control")], [])
    rec = state["d1"]
    assert rec is not None and js.decode(js.encode(rec)) == rec


def test_label_carries_the_decisions_snapshot_compactly() -> None:
    vector = [0.0, 0.1234, 2.5, -0.75] + [0.0] * 60
    packed = js.pack_interest(vector)
    assert len(packed) == 2 * len(vector)  # float16: two bytes a number
    state: dict[str, js.Pending | None] = {}
    d = dec("d1", 0, pctr_raw=0.2, device="mobile", interest=packed)
    run(state, [d], [])
    rec = state["d1"]
    assert rec is not None and js.decode(js.encode(rec)) == rec
    assert len(js.encode(rec)) < 250  # bounded: one per decision for window + grace
    (lab,) = js.close_due(state, 5000, P).labels
    assert first_error("ctr-feedback", msgspec.to_builtins(lab)) is None
    assert lab.features.interest == [0.0, 0.1234, 2.5, -0.75] + [0.0] * 60
    assert lab.features.device == "mobile"
    assert lab.features.pctr == 0.2 and lab.pctr == 0.1  # raw vs served


def test_a_record_written_before_the_snapshot_fields_still_decodes() -> None:
    rec = js.Pending(js.OPEN, "u1", "ad1", 1000, 0.5, "greedy", 0.1)
    names = list(rec.__struct_fields__)
    older = msgspec.msgpack.encode([getattr(rec, f) for f in names[: names.index("pctr_raw")]])
    back = js.decode(older)
    assert back.interest == b"" and back.pctr_raw == -1.0
    features = js.label("d1", back, 0, 2000, "window_expired").features
    assert features.interest == [] and features.pctr == 0.1


def test_a_sequence_models_behaviours_reach_the_label() -> None:
    pairs = [(13, 1), (12, 2), (11, 1)]
    state: dict[str, js.Pending | None] = {}
    run(state, [dec("d1", 0, sequence=js.pack_sequence(pairs))], [])
    rec = state["d1"]
    assert rec is not None and js.decode(js.encode(rec)) == rec
    (lab,) = js.close_due(state, 5000, P).labels
    assert first_error("ctr-feedback", msgspec.json.decode(msgspec.json.encode(lab))) is None
    assert lab.features.sequence == pairs
    # Without one (a plain model's decision, or a record written before): no field at all.
    run(state, [dec("d2", 1)], [])
    (plain,) = js.close_due(state, 9000, P).labels
    assert plain.features.sequence is msgspec.UNSET
