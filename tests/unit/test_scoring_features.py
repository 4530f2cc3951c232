"""Feature assembly: the arrays the spec promises, and serving agrees with training."""

from __future__ import annotations

import numpy as np

from scoring.embeddings import HashedEmbeddings
from scoring.featurespec import (
    AdIndex,
    FeatureSpec,
    RequestFeatures,
    assemble,
    assemble_each,
    assemble_many,
    concat,
    from_feedback,
)

SPEC = FeatureSpec(dim=16)
ADS = [
    {"ad_id": "a0", "campaign_id": "c1", "category_id": 7, "bid": 1.5},
    {"ad_id": "a1", "campaign_id": "c2", "category_id": 8, "bid": 0.5, "item_id": 80_001},
    {"ad_id": "a2", "campaign_id": "c1", "category_id": 9, "bid": 2.0, "embedding": [1.0] * 16},
]


def test_assembled_inputs_have_the_spec_names_dtypes_and_shapes() -> None:
    index = AdIndex.build(ADS, SPEC)
    rows = index.rows(["a2", "a0", "a1", "a0"])
    x = assemble(np.arange(16.0), rows, index, "home_banner", "mobile", 1_700_000_000_000, SPEC)
    assert list(x) == list(SPEC.input_names)
    for inp in SPEC.inputs:
        assert x[inp.name].dtype == np.dtype(inp.dtype)
        assert x[inp.name].shape == (4, inp.width)
        assert x[inp.name].flags.c_contiguous


def test_user_vector_is_unit_and_unknown_user_is_zero() -> None:
    index = AdIndex.build(ADS, SPEC)
    known = assemble(np.full(16, 3.0), index.rows(["a0"]), index, "p", None, 0, SPEC)
    cold = assemble(None, index.rows(["a0"]), index, "p", None, 0, SPEC)
    assert np.isclose(np.linalg.norm(known["user"][0]), 1.0)
    assert not cold["user"].any()
    assert known["dense"][0, 3] == 1.0 and cold["dense"][0, 3] == 0.0


def test_ad_embedding_prefers_catalog_then_item_then_category() -> None:
    index = AdIndex.build(ADS, SPEC)
    table = HashedEmbeddings(SPEC.dim, SPEC.embedding_seed)
    cat = table.categories([7])[0]
    assert np.allclose(index.embedding[0], cat / np.linalg.norm(cat), atol=1e-6)
    assert np.allclose(index.embedding[2], np.full(16, 0.25), atol=1e-6)
    assert not np.allclose(index.embedding[1], table.categories([8])[0], atol=1e-3)


def test_a_logged_row_gives_the_same_inputs_as_the_served_row() -> None:
    index = AdIndex.build(ADS, SPEC)
    interest = np.linspace(-1, 1, 16)
    ts = 1_700_000_000_000
    served = assemble(interest, index.rows(["a1"]), index, "feed", "tablet", ts, SPEC)
    logged = from_feedback(
        [
            {
                "decision_ts": ts,
                "features": {
                    "interest": interest.tolist(),
                    "placement": "feed",
                    "device": "tablet",
                    "category_id": 8,
                    "campaign_id": "c2",
                    "item_id": 80_001,
                },
            }
        ],
        SPEC,
    )
    for k in SPEC.input_names:
        assert np.allclose(served[k], logged[k], atol=1e-6), k


def test_concat_stacks_requests_row_wise() -> None:
    index = AdIndex.build(ADS, SPEC)
    a = assemble(None, index.rows(["a0"]), index, "p", None, 0, SPEC)
    b = assemble(None, index.rows(["a1", "a2"]), index, "p", None, 0, SPEC)
    assert concat([a, b])["ids"].shape == (3, 4)


def test_docstring_examples_hold() -> None:
    import doctest

    import scoring.featurespec
    import scoring.registry
    import scoring.synthetic

    for mod in (scoring.featurespec, scoring.registry, scoring.synthetic):
        failed, _ = doctest.testmod(mod)
        assert failed == 0, mod.__name__


def test_assemble_many_equals_per_request_assemble_concatenated() -> None:
    spec = FeatureSpec()
    ads = AdIndex.build(
        [{"ad_id": f"a{i}", "campaign_id": f"c{i % 3}", "category_id": i, "bid": 1.0,
          "daily_budget": 10.0, "targeting": {}} for i in range(20)],
        spec,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    reqs = [
        RequestFeatures(rng.normal(size=spec.dim), np.array([1, 5, 7]), "home", "mobile"),
        RequestFeatures(None, np.array([0, 19]), "feed", None),
        RequestFeatures(rng.normal(size=spec.dim) * 3, np.arange(20), "feed", "tv"),
    ]
    ts = 1_700_000_000_000
    many = assemble_many(reqs, ads, ts, spec)
    one_by_one = concat(
        [assemble(r.interest, r.rows, ads, r.placement, r.device, ts, spec) for r in reqs]
    )
    assert many.keys() == one_by_one.keys()
    for name in many:
        np.testing.assert_allclose(many[name], one_by_one[name], rtol=1e-6)
        assert many[name].dtype == one_by_one[name].dtype


def test_assemble_each_gives_each_request_what_it_gets_assembled_alone() -> None:
    """A sequence model runs each request alone; one assembly sliced per request must give
    every run the inputs ``assemble_many([request])`` gives, bit for bit, with its own
    sequence length (not the batch's longest), as contiguous arrays."""
    from dataclasses import replace

    spec = replace(FeatureSpec(), sequence=12)
    ads = AdIndex.build(
        [{"ad_id": f"a{i}", "campaign_id": f"c{i % 3}", "category_id": i, "bid": 1.0}
         for i in range(20)],
        spec,
    )  # fmt: skip
    rng = np.random.default_rng(1)

    def seq(n: int) -> np.ndarray:
        return rng.normal(size=(n, spec.dim)).astype(np.float32)

    reqs = [
        RequestFeatures(rng.normal(size=spec.dim), np.array([1, 5, 7]), "home", "mobile", seq(4)),
        RequestFeatures(None, np.array([0, 19]), "feed", None, None),
        RequestFeatures(rng.normal(size=spec.dim), np.arange(20), "feed", "tv", seq(30)),
        RequestFeatures(rng.normal(size=spec.dim), np.array([3]), "home", None, seq(1)),
    ]
    ts = 1_700_000_000_000
    each = assemble_each(reqs, ads, ts, spec)
    assert len(each) == len(reqs)
    for got, r in zip(each, reqs, strict=True):
        alone = assemble_many([r], ads, ts, spec)
        assert got.keys() == alone.keys()
        for name, want in alone.items():
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            assert np.array_equal(got[name], want), name
            assert got[name].flags["C_CONTIGUOUS"], name
    assert [x["seq"].shape[1] for x in each] == [4, 1, 12, 1]


def test_ad_rows_keep_the_order_given_and_skip_unknown_ids_including_row_zero() -> None:
    """Row 0 is a valid row (a lookup that tested truthiness would drop it); unknown ids
    are skipped; an all-unknown list gives an empty int64 array."""
    index = AdIndex.build(ADS, SPEC)
    assert index.rows(["a2", "zz", "a0", "a1", "a0"]).tolist() == [2, 0, 1, 0]
    none = index.rows(["zz"])
    assert none.dtype == np.int64 and len(none) == 0
