from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import CommonSettings

IMAGE_UPLOAD_BYTES = 5 * 1024 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class GatewaySettings(CommonSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_by_name=True,
    )

    auth_url: str = "http://127.0.0.1:8001"
    inventory_url: str = "http://127.0.0.1:8002"
    orders_url: str = "http://127.0.0.1:8003"
    audit_url: str = "http://127.0.0.1:8004"
    upstream_connect_timeout_seconds: float = Field(2.0, gt=0)
    upstream_timeout_seconds: float = Field(15.0, gt=0)
    upstream_pool_size: int = Field(100, ge=1)
    image_upload_max_bytes: int = Field(IMAGE_UPLOAD_BYTES, ge=1024)
