"""The orders service's own metrics (the shared HTTP ones are in common.metrics)."""

from prometheus_client import Histogram

BATCH_SIZE = Histogram(
    "comptoir_orders_batch_size",
    "Orders carried by one batch (they arrived while the previous batches were out): reserve calls to "
    "inventory, idempotency-key claims and placement records.",
    ["batch"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 100),
)
