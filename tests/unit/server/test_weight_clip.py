"""The hostile peer: one institution declares 2^52 examples; the server clips it and records the clip in the ledger."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from common.aggregation import WEIGHTED_RULES, AggregationParams, aggregate
from common.audit import kinds
from common.messages import SoftLabelQuery, SoftLabelReply
from server.audit_trail import AuditTrail
from server.secure_rounds import sum_out_of_range
from server.server_app import collect_and_aggregate

from grid import MemoryGrid
from run_fixtures import tiny_cfg

NODES = [11, 12, 13]
LIAR = 13
SAMPLES, CLASSES = 5, 3
COUNTS = {11: [40, 30, 30], 12: [50, 20, 50], 13: [30, 30, 40]}  # 100, 120 and 100 private samples


def soft_labels(node: int) -> np.ndarray:
    """(SAMPLES, CLASSES) float32: nodes 11 and 12 say class 0, the liar says class 2."""
    rng = np.random.default_rng(node)
    return rng.dirichlet([1, 1, 8] if node == LIAR else [8, 1, 1], size=SAMPLES).astype(np.float32)


def institutions(lie: bool) -> Callable[[Message], RecordDict]:
    """Each node answers the query honestly, except that the liar (when `lie`) declares 2^52 examples."""
    def answer(message: Message) -> RecordDict:
        node = message.metadata.dst_node_id
        query = SoftLabelQuery.from_record(message.content)
        counts = np.asarray(COUNTS[node], dtype=np.int64)
        if lie and node == LIAR:
            counts = counts * (2**52 // 100)
        return SoftLabelReply(round=query.round, fingerprint=query.fingerprint, codec=query.codec,
                              soft_labels=soft_labels(node), num_examples=int(counts.sum()), train_loss=0.4,
                              teacher_accuracy=-1.0, teacher_params=100, teacher_rounds=1,
                              class_counts=counts if query.want_class_counts else None).to_record()
    return answer


@pytest.mark.parametrize("rule", sorted(WEIGHTED_RULES))
def test_a_peer_declaring_2_to_the_52_examples_cannot_own_the_ensemble(
        rule: str, tmp_path: Path, memory_grid: type[MemoryGrid]) -> None:
    # Prepare
    cfg = tiny_cfg(**{"aggregation": rule, "num-clients": 3, "min-clients": 3, "weight-clip": 4.0})
    query = SoftLabelQuery(round=1, fingerprint="ab" * 32, temperature=2.0, codec="float32", num_classes=CLASSES,
                           sample_ids=np.arange(SAMPLES, dtype=np.int64), evaluate_teacher=False,
                           want_class_counts=rule != "weighted")
    honest_trail = AuditTrail.open(cfg, tmp_path / "honest", 7)
    lying_trail = AuditTrail.open(cfg, tmp_path / "lying", 7)

    # Execute
    _, honest = collect_and_aggregate(memory_grid(institutions(lie=False), NODES), cfg, honest_trail, query)
    _, lying = collect_and_aggregate(memory_grid(institutions(lie=True), NODES), cfg, lying_trail, query)

    # Assert: the liar weighs 4 x the lower median (120) = 480 examples, not 2^52
    capped = [np.asarray(COUNTS[n], dtype=np.float64) for n in NODES[:2]] + [np.asarray(COUNTS[LIAR]) * 4.8]
    expected = aggregate(rule, [soft_labels(n) for n in NODES], [100, 120, 480],
                         capped if rule != "weighted" else None, AggregationParams(temperature=2.0))
    np.testing.assert_allclose(lying.probs, expected.probs, atol=1e-6)
    assert (honest.probs.argmax(axis=1) == 0).all()
    clips = [e["body"] for e in lying_trail.ledger.entries() if e["kind"] == kinds.WEIGHT_CLIPPED]
    assert clips == [{"round": 1, "node_id": str(LIAR), "institution_id": None, "check": "weight-clip",
                      "declared": float(100 * (2**52 // 100)), "used": 480.0}]
    assert not [e for e in honest_trail.ledger.entries() if e["kind"] == kinds.WEIGHT_CLIPPED]


def test_secure_aggregation_refuses_an_opened_sum_out_of_range() -> None:
    # Prepare: three institutions' [w * p, w], summed as the server opens them
    probs = {n: soft_labels(n).astype(np.float64) for n in NODES}
    weights = {11: 100.0, 12: 120.0, 13: 100.0}

    def opened(lying_weight: float | None = None, scale: float = 1.0) -> np.ndarray:
        w = {**weights, **({LIAR: lying_weight} if lying_weight else {})}
        return sum(np.concatenate([w[n] * scale * probs[n].reshape(-1), [w[n]]]) for n in NODES)

    # Execute
    honest = sum_out_of_range(opened(), SAMPLES, CLASSES, 3, True, [100.0, 120.0, 100.0])
    no_caps = sum_out_of_range(opened(), SAMPLES, CLASSES, 3, True, None)
    over_cap = sum_out_of_range(opened(lying_weight=2.0**29), SAMPLES, CLASSES, 3, True, [100.0, 120.0, 100.0])
    inflated = sum_out_of_range(opened(scale=1e3), SAMPLES, CLASSES, 3, True, None)
    mean_weight = sum_out_of_range(opened(), SAMPLES, CLASSES, 3, False, None)

    # Assert
    assert honest == "" and no_caps == ""
    assert "summed weight is 5.36871e+08, expected in [3, 320]" in over_cap
    assert "not rows on the simplex" in inflated
    assert "expected exactly 3" in mean_weight
