"""Client credentials for service-to-service calls: each service proves its secret, gets a 5-minute token."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from common.errors import ServiceError
from services.auth.context import RequestContext, Runtime, constant_time_equal, sha256_hex
from services.auth.errors import AudienceNotAllowed, InvalidClient
from services.auth.schemas import ServiceTokenRequest, ServiceTokenResponse

# Compared against when the client is unknown, so that unknown and known clients cost the same.
_NO_DIGEST = "0" * 64


class ServiceClients:
    def __init__(self, db: AsyncSession, rt: Runtime, ctx: RequestContext) -> None:
        self.db = db
        self.rt = rt
        self.ctx = ctx

    async def _refuse(self, error: ServiceError, client_id: str, audience: str, reason: str) -> None:
        await self.ctx.audit(
            self.db,
            "auth.service_token.denied",
            outcome="denied",
            resource_type="service_client",
            resource_id=client_id[:64],
            new_values={"audience": audience[:64], "reason": reason},
        )
        await self.db.commit()
        raise error

    async def issue(self, body: ServiceTokenRequest) -> ServiceTokenResponse:
        settings = self.rt.settings
        expected = settings.service_clients.get(body.client_id)
        matches = constant_time_equal(sha256_hex(body.client_secret), expected or _NO_DIGEST)
        if expected is None or not matches:
            await self._refuse(InvalidClient(), body.client_id, body.audience, "bad_credentials")
        if body.audience not in settings.service_audiences.get(body.client_id, []):
            await self._refuse(AudienceNotAllowed(), body.client_id, body.audience, "audience_not_allowed")
        token = self.rt.issuer.service_token(client=body.client_id, audience=body.audience)
        return ServiceTokenResponse(access_token=token, expires_in=settings.service_token_ttl_seconds)
