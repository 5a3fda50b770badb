"""Names vulture reports as unused that are used where it cannot see (``make lint`` runs vulture).

Only real false positives belong here: each is read by a framework, a library, the environment or the
database, never by our own calls. Routes, validators and Alembic hooks are ignored by pattern in
pyproject.toml ([tool.vulture]).
"""

# Written to, read by the library: the stdlib logger, Pillow's decoder limits.
_.disabled  # logging.getLogger("uvicorn.access").disabled (common/logging.py)
_.MAX_IMAGE_PIXELS  # PIL.Image (services/inventory/images.py)
_.LOAD_TRUNCATED_IMAGES  # PIL.ImageFile (services/inventory/images.py)
_.mtime  # tarfile.TarInfo, written into the archive (comptoir/backup.py)

# asyncio protocol and httptools parser callbacks, called by the event loop and the parser.
_.connection_made
_.connection_lost
_.data_received
_.on_header
_.on_headers_complete
_.on_body
_.on_message_complete

# An enum member chosen from the environment (ENVIRONMENT=test).
test

# Settings read by name: RunSettings.port(process) and .database_url(service) use getattr (comptoir/config.py).
inventory_port
auth_port
audit_port
orders_port
auth_database_url
inventory_database_url
orders_database_url
audit_database_url

# Token claims, response fields and columns: pydantic and SQLAlchemy read and write them, clients read them.
iss
first_seen_at
checkpoints_checked
truncated
pseudonym_removed
password_changed_at
_.password_changed_at
token_type
expires_in
refresh_expires_in
refresh_idle_expires_in
has_more
seq  # the revocation feed's column and field (services/auth/internal_router.py reads it by name)
generated_at
phone_verifications
password_resets
_.image_urls  # Product.image_urls, read by ProductRead (from_attributes)
image_urls
delta_on_hand
delta_reserved
requested
anonymised_at
line_total_xaf
orders_anonymised

# Read by the tests only (test hooks on the app and its parts).
_.security_events  # app.state.security_events (tests/gateway/test_security.py)
_.is_open  # Circuit.is_open (tests/gateway/test_routing.py)
_.wake  # OutboxRelay.wake (tests/audit/test_relay.py)

# Written, never read: common/revocation.py is being reworked on the resilience branch, which decides it.
_.synced_at

# Read by the tests that prove the breaker's half-open state (tests/gateway/test_circuit.py).
_.probing

# Fields of pydantic models in the public contract: read by the serialiser and by clients.
_.msg  # common.errors.FieldError
_.short_items  # common.errors.OrderConflictProblem
_.order_status  # common.errors.OrderTransitionProblem
_.requested_status
_.withdrawn  # the short items of inventory's and orders' 409s
_.kty  # services.auth.schemas (JWK)
_.crv
_.use

# Imported by name by uvicorn in each gateway worker (comptoir/serve.py).
_.gateway_worker

# The public operations of the document and of the route table, compared by tests/gateway/test_openapi.py.
_.public_operations
_.table_operations

# Fields of the auth service's answers (pydantic models): serialised for clients, read by no code of ours.
_.current_terms_version  # services.auth.consent.ConsentRead
_.recovery_codes  # services.auth.mfa
_.totp_enabled
_.recovery_codes_left
_.accept_terms  # services.auth.schemas.RegisterRequest (checked by its validator)
_.csrf_token  # services.auth.schemas (browser session mode)
_.consent  # services.auth.schemas.Export
second_factor  # services.auth.schemas.Export
# The purge report (services.auth.retention.PurgeReport): counts printed by `comptoir purge`.
_.otp_codes
_.otp_sends
_.reset_links
# comptoir.clients.OperatorSecrets: pydantic-settings fills them from the environment and .env.
_.gateway_client_secret
_.auth_client_secret
_.inventory_client_secret
_.orders_client_secret
_.audit_client_secret
_.auth_service_clients
_.mfa_challenges
_.anonymised

# uvicorn's request cycle reads these (gateway/server.py sets them as uvicorn's own writer does).
_.waiting_for_100_continue
_.__class__
# uvicorn's protocol calls it when its HTTP parser refuses a request (gateway/server.py overrides it).
_.send_400_response
