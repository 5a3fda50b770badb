"""The audit service's Prometheus metrics (names start with comptoir_audit_)."""

from prometheus_client import Counter, Gauge

EVENTS_STORED = Counter("comptoir_audit_events_stored_total", "Audit events appended to the chain.", ["service"])
EVENTS_DUPLICATE = Counter(
    "comptoir_audit_events_duplicate_total", "Re-delivered audit events (already stored).", ["service"]
)
CHAIN_HEAD = Gauge("comptoir_audit_chain_head_sequence", "Sequence of the newest event in the chain.")
ALERTS = Counter("comptoir_audit_alerts_total", "Security alerts opened, by rule.", ["rule"])
VERIFY_RUNS = Counter("comptoir_audit_verify_total", "Chain verifications, by result.", ["result"])
CHECKPOINTS = Counter("comptoir_audit_checkpoints_total", "Signed checkpoints, by kind.", ["kind"])
CHECKPOINT_SEQUENCE = Gauge("comptoir_audit_checkpoint_sequence", "Sequence of the newest signed checkpoint.")
