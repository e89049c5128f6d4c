"""serving.runtime.top_k, which every answer goes through (/classify, /classify_batch, /v2, the batch CLI): the k
best classes by softmax probability, best first, ties in class order, for short rows (sorted whole) and long ones
(partitioned first) alike."""

from __future__ import annotations

import numpy as np
import pytest

from serving.runtime import SHORT_ROW, softmax, softmax_row, top_k


def reference(logits: np.ndarray, k: int, labels: list[str]) -> list[list[dict]]:
    """The definition, spelled out: sort every class by probability, keep the first k."""
    out = []
    for row in softmax(np.atleast_2d(logits)):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        out.append([{"index": i, "label": labels[i], "score": float(row[i])} for i in order])
    return out


@pytest.mark.parametrize("classes", [10, 1000])
def test_top_k_is_the_k_most_probable_in_order(classes: int) -> None:
    rng = np.random.default_rng(classes)
    labels = [f"class {i}" for i in range(classes)]
    for _ in range(200):
        logits = (rng.standard_normal((int(rng.integers(1, 4)), classes)) * rng.choice([0.1, 3.0, 30.0]))
        logits = logits.astype(np.float32)
        if rng.random() < 0.3:  # ties: the earlier class first
            logits[:, classes // 2] = logits[:, 1]
        for k in (1, 3, 5, classes):
            got = top_k(logits, k, labels)
            assert got == reference(logits, k, labels)
            assert all(type(p["index"]) is int and type(p["score"]) is float for row in got for p in row)


def test_top_k_leaves_the_logits_alone() -> None:
    logits = np.arange(10, dtype=np.float32)[None]
    top_k(logits, 3, [str(i) for i in range(10)])
    assert logits.tolist() == [list(range(10))]


def test_short_rows_are_the_float64_softmax() -> None:
    """Rows of up to SHORT_ROW classes are scored in plain Python (cheaper than numpy on 10 values): the same float64
    softmax as numpy's formula to 1e-14 (the sums are rounded differently), every row sums to 1, and `softmax()`
    gives `softmax_row`'s values exactly."""
    rng = np.random.default_rng(7)
    for classes in (1, 2, 10, SHORT_ROW):
        logits = (rng.standard_normal((50, classes)) * rng.choice([0.1, 3.0, 30.0, 300.0])).astype(np.float32)
        z = logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        expected = z / z.sum(axis=1, keepdims=True)
        got = softmax(logits)
        assert got.dtype == np.float64 and got.shape == logits.shape
        np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-14)
        assert got.tolist() == [softmax_row(row) for row in logits.tolist()]


def test_classify_answer_is_the_json_response_it_replaces() -> None:
    """/classify writes its answer from pieces made once per model (serving/api.py, `classify_answer`): the bytes
    and headers must be JSONResponse's exactly, for the real models' labels and for labels JSON must escape."""
    import dataclasses

    from starlette.responses import JSONResponse

    from serving.api import classify_answer, read_models
    from serving.registry import DEFAULT_MODELS_DIR

    models = list(read_models(DEFAULT_MODELS_DIR).values())
    odd = ['say "hi"', "back\\slash", "tab\there", "new\nline", "é ü 猫", "\x00\x1f", "</script>", "\u2028"]
    models.append(dataclasses.replace(models[0], labels=odd + [str(i) for i in range(len(models[0].labels) - 8)]))
    rng = np.random.default_rng(0)
    for model in models:
        n = len(model.labels)
        rows = [rng.normal(0, 5, n), np.zeros(n), rng.normal(0, 50, n), np.full(n, -1e30)]
        for logits in rows:
            for k in (1, 5, n):
                predictions = top_k(logits, k, model.labels)[0]
                ours = classify_answer(model, predictions)
                theirs = JSONResponse({**model.header, "predictions": predictions})
                assert ours.body == theirs.body
                assert ours.raw_headers == theirs.raw_headers
    with pytest.raises(ValueError):  # as json.dumps(allow_nan=False) refuses it
        classify_answer(models[0], [{"index": 0, "label": models[0].labels[0], "score": float("nan")}])
