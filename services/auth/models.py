from sqlalchemy.orm import DeclarativeBase

from common.models import schema_metadata


class Base(DeclarativeBase):
    metadata = schema_metadata("auth")
