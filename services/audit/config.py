from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings

EVENTS_PATH = r"^/internal/events$"


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AUDIT_")  # the rest comes from CommonSettings

    # Ingest: at most this many events per POST /internal/events, and this many bytes of body.
    max_batch_events: int = Field(1000, ge=1, le=1000)
    ingest_max_body_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)

    # Signed checkpoints of the chain head: how often (0 = only on demand), with which Ed25519 key.
    checkpoint_interval_seconds: float = Field(60.0, ge=0)
    # Empty means <DATA_DIR>/keys/audit-checkpoint.key (generated 0600 on first start).
    checkpoint_key_file: Path | None = None
    # Every checkpoint is also appended here, outside the database; empty means <DATA_DIR>/audit/checkpoints.jsonl.
    checkpoint_log_file: Path | None = None
    # Further public keys whose checkpoints verify accepts (base64url raw Ed25519, comma-separated):
    # other replicas' keys, or a key that was rotated out.
    checkpoint_trusted_keys: str = ""

    # Retention: events recorded more than this many days ago may be archived and dropped (0 = keep forever).
    retention_days: int = Field(0, ge=0)

    # Alert rules.
    failed_login_threshold: int = Field(10, ge=1)
    failed_login_window_seconds: int = Field(300, ge=1)

    # GDPR access: at most this many events in one export (newest first).
    export_max_events: int = Field(10_000, ge=1, le=100_000)

    @property
    def checkpoint_key_path(self) -> Path:
        return self.checkpoint_key_file or self.data_dir / "keys" / "audit-checkpoint.key"

    @property
    def checkpoint_trusted_dir(self) -> Path:
        """Public keys trusted besides the local key's, one ``<key id>.pub`` file each (restored backups)."""
        return self.data_dir / "keys" / "trusted-checkpoint-keys"

    @property
    def checkpoint_log_path(self) -> Path:
        return self.checkpoint_log_file or self.data_dir / "audit" / "checkpoints.jsonl"
