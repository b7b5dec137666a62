"""One History for every run (labsupport.fl.history)."""

from __future__ import annotations

import json
import math

import pytest

from labsupport.fl.history import History, RoundRecord


def _history():
    h = History()
    h.append(RoundRecord(1, [0, 1], {1: "nan"}, 2.0, None, None, 100, 200, 0.5, 0.0, {"eps": 0.1}))
    h.append(RoundRecord(2, [0, 1], {}, 1.5, 0.6, 1.1, 100, 200, 0.5, 0.1, {"eps": 0.2}))
    h.append(RoundRecord(3, [1], {}, 1.0, 0.8, 0.7, 50, 100, 0.5, 0.1, {}))
    return h


def test_columns_evaluated_rounds_and_cumulative_sums():
    h = _history()
    assert len(h) == 3
    assert h.column("accuracy") == [None, 0.6, 0.8]
    assert h.column("eps") == [0.1, 0.2, None]  # an extra entry
    assert h.evaluated() == ([2, 3], [0.6, 0.8])
    assert h.evaluated("eps") == ([1, 2], [0.1, 0.2])
    assert h.cumulative("bytes_up") == [100, 200, 250]
    assert h.cumulative("eps") == [0.1, pytest.approx(0.3), pytest.approx(0.3)]
    assert h.rounds_to(0.7) == 3 and h.rounds_to(0.6) == 2 and h.rounds_to(0.9) is None
    assert h.final_accuracy == 0.8
    assert History().final_accuracy is None and History().evaluated() == ([], [])


def test_to_dicts_round_trips_through_json_with_integer_client_keys():
    h = _history()
    rows = json.loads(json.dumps(h.to_dicts()))  # JSON turns the rejected keys into strings
    back = History.from_dicts(rows)
    assert back == h
    assert back.rounds[0].rejected == {1: "nan"}


def test_from_dicts_refuses_unknown_fields():
    rows = _history().to_dicts()
    rows[1]["accuracy_top5"] = 0.9
    with pytest.raises(ValueError, match=r"row 1 has unknown fields \['accuracy_top5'\]"):
        History.from_dicts(rows)


def test_from_flower_drops_round_zero_maps_errors_and_keeps_the_rest_as_extra():
    rows = [
        {"round": 0, "accuracy": 0.1, "loss": 2.3},
        {
            "round": 1,
            "accuracy": 0.5,
            "loss": float("nan"),
            "train_loss": 1.2,
            "clients": [3, 1],
            "errors": ["timeout"],
            "seconds": 2.5,
            "eps": 0.4,
        },
        {"round": 2, "accuracy": None, "clients": "n/a"},
    ]
    h = History.from_flower(rows)
    assert [r.round for r in h.rounds] == [1, 2]
    first = h.rounds[0]
    assert first.accuracy == 0.5 and first.loss is None and first.train_loss == 1.2
    assert first.clients == [3, 1] and first.rejected == {0: "timeout"} and first.seconds == 2.5
    assert first.extra == {"eps": 0.4}
    assert h.rounds[1].clients == [] and h.rounds[1].accuracy is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in h.column("loss") if v)
