from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True, extra="forbid")


class ProductRead(Schema):
    id: uuid.UUID
    sku: str
    name: str
    description: str
    price_xaf: int
    is_active: bool
    available: int
    image_urls: list[str] = []
    created_at: datetime
    updated_at: datetime
