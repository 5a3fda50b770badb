from common.migrations import run_migrations
from services.audit.models import Base

run_migrations(Base.metadata)
