from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings

# The only multipart route (the gateway's IMAGE_UPLOAD_PATH says the same; services never import the gateway).
IMAGE_UPLOAD_PATH = r"^/api/v1/products/[^/]+/images/?$"
IMAGE_MAX_BYTES = 5 * 1024 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="INVENTORY_")  # the rest comes from CommonSettings

    # A reservation that orders neither commits nor releases in this time is released by the sweeper.
    reservation_ttl_seconds: int = Field(900, ge=10, le=86_400)
    # How often the sweeper looks for expired reservations.
    sweep_interval_seconds: float = Field(15.0, gt=0, le=3600)
    # How long a stock change waits for a product row lock before it gives up with 503 (never forever).
    lock_timeout_ms: int = Field(2000, ge=50, le=60_000)
    # Uploaded images: at most this many bytes and pixels, this many per product.
    image_max_bytes: int = Field(IMAGE_MAX_BYTES, ge=1024, le=IMAGE_MAX_BYTES)
    image_max_pixels: int = Field(40_000_000, ge=1, le=40_000_000)
    max_images_per_product: int = Field(20, ge=1, le=200)
    # Where re-encoded images are written; empty means <DATA_DIR>/uploads/inventory.
    upload_dir: Path | None = None

    @property
    def images_dir(self) -> Path:
        return self.upload_dir or self.data_dir / "uploads" / "inventory"
