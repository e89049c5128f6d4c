"""What a correct answer from the service looks like, so that a fast wrong answer counts as a failure.

Shared by the Locust traffic and the benchmark's pre-flight check; plain Python (no Locust, no gevent).
"""

from __future__ import annotations

NUM_CLASSES = {"alexnet": 1000, "lenet5": 10}
BATCH_FIELD = "images"  # the multipart field name /classify_batch reads, once per image


def check_predictions(result: object, model: str, k: int) -> str | None:
    """Why a single-image result is wrong, or None if it has the documented shape."""
    if not isinstance(result, dict):
        return f"result is {type(result).__name__}, not an object"
    if result.get("model") != model:
        return f"answered for model {result.get('model')!r}, asked {model!r}"
    missing = {"version", "weights", "predictions"} - result.keys()
    if missing:
        return f"missing keys {sorted(missing)}"
    return check_prediction_list(result["predictions"], model, k)


def check_prediction_list(preds: object, model: str, k: int) -> str | None:
    """Why a list of top-k predictions is wrong (count, fields, ranges, order), or None."""
    expected = min(k, NUM_CLASSES[model])
    if not isinstance(preds, list) or len(preds) != expected:
        return f"expected {expected} predictions, got {len(preds) if isinstance(preds, list) else repr(preds)[:80]}"
    scores = []
    for p in preds:
        if not (isinstance(p, dict) and isinstance(p.get("index"), int) and isinstance(p.get("label"), str)
                and isinstance(p.get("score"), float) and 0 <= p["index"] < NUM_CLASSES[model]
                and 0.0 <= p["score"] <= 1.0):
            return f"malformed prediction {p!r}"
        scores.append(p["score"])
    if scores != sorted(scores, reverse=True):
        return "predictions are not sorted by score"
    return None


def check_batch(body: object, model: str, k: int, sent: int) -> str | None:
    """Why a /classify_batch answer for `sent` valid images is wrong, or None.

    The answer is {"model", "version", "weights", "results": [{"index", "filename", "predictions"} or an error]}.
    """
    if not isinstance(body, dict) or body.get("model") != model or not isinstance(body.get("results"), list):
        return f"not a batch answer for {model!r}: {str(body)[:120]}"
    items = body["results"]
    if len(items) != sent:
        return f"sent {sent} images, got {len(items)} results"
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("index") != i:
            return f"result {i} is out of order or malformed: {str(item)[:120]}"
        if "predictions" not in item:
            return f"image {i} failed: {item.get('error')}: {item.get('detail')}"
        problem = check_prediction_list(item["predictions"], model, k)
        if problem:
            return f"image {i}: {problem}"
    return None
