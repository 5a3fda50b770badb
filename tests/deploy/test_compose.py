"""docker-compose.yml, deploy/Dockerfile and .env.example: hardened, and in agreement with each other."""

from __future__ import annotations

import importlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from tests.deploy.compose_render import InterpolationError, parse_dotenv, render, service_environment

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
PRODUCTION_EXAMPLE = ROOT / "deploy" / "production.env.example"

PORTS = {"gateway": 8000, "auth": 8001, "inventory": 8002, "orders": 8003, "audit": 8004}
APP_SERVICES = list(PORTS)
UPSTREAMS = [name for name in APP_SERVICES if name != "gateway"]
INFRA_SERVICES = ["postgres", "redis"]
# One-shot tools (profile "tools"): `docker compose run --rm check` runs the deploy checks.
TOOLS = ["check"]
IMAGE_SERVICES = [*APP_SERVICES, "migrate", *TOOLS]
LONG_RUNNING = [*INFRA_SERVICES, *APP_SERVICES]
DB_PASSWORDS = {name: f"{name.upper()}_DB_PASSWORD" for name in UPSTREAMS}
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY")
ROOT_USERS = {"", "0", "root"}
# A container listens on every interface of its own network namespace; only published ports leave it.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
# Scratch space on a read-only root file system: a tmpfs, private to the container.
TMP = "/tmp"  # noqa: S108

# ${VAR}, ${VAR:-default}, ${VAR:?message} and $VAR, but not the $$ escape.
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")
ENV_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def env_example(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """The variables .env.example sets (commented-out lines only document defaults)."""
    assignments = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = ENV_ASSIGNMENT.match(line.strip())
        if match:
            assignments[match.group(1)] = match.group(2)
    return assignments


def env_example_documents(path: Path = ENV_EXAMPLE) -> set[str]:
    """Every variable the file sets or documents on a commented-out ``# NAME=`` line."""
    names = set(env_example(path))
    for line in path.read_text(encoding="utf-8").splitlines():
        match = ENV_ASSIGNMENT.match(line.strip().lstrip("#").strip())
        if match:
            names.add(match.group(1))
    return names


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    pairs = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def test_compose_file_parses_and_declares_every_process(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {*INFRA_SERVICES, "migrate", *APP_SERVICES, *TOOLS}


def test_only_the_gateway_publishes_a_port(services: dict[str, dict[str, Any]]) -> None:
    assert [name for name, service in services.items() if service.get("ports")] == ["gateway"]
    (published,) = services["gateway"]["ports"]
    assert str(published).endswith(":8000")
    assert "127.0.0.1:8000" in str(published), "the default must publish on loopback only"
    assert not [name for name, service in services.items() if service.get("network_mode")]


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_application_containers_run_the_project_image_as_non_root(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    build = service["build"]
    assert Path(build["context"]) == Path(".")
    assert build["dockerfile"] == "deploy/Dockerfile"
    user = str(service.get("user", ""))
    assert user.split(":")[0] not in ROOT_USERS, f"{name} must run as a non-root user, got {user!r}"


def test_every_application_container_shares_one_image(services: dict[str, dict[str, Any]]) -> None:
    assert len({services[name]["image"] for name in IMAGE_SERVICES}) == 1


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_a_healthcheck(services: dict[str, dict[str, Any]], name: str) -> None:
    healthcheck = services[name].get("healthcheck") or {}
    assert not healthcheck.get("disable", False)
    test = healthcheck.get("test")
    assert test, f"{name} has no healthcheck"
    assert test[0] != "NONE"


@pytest.mark.parametrize(("name", "port"), list(PORTS.items()))
def test_each_process_listens_and_is_probed_on_its_own_port(
    services: dict[str, dict[str, Any]], name: str, port: int
) -> None:
    service = services[name]
    command = service["command"]
    assert command[:4] == ["python", "-m", "comptoir.serve", name]
    assert command[command.index("--port") + 1] == str(port)
    assert command[command.index("--host") + 1] == ALL_INTERFACES
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"])


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_application_containers_are_confined(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    limits = service["deploy"]["resources"]["limits"]
    assert limits.get("cpus"), f"{name} has no CPU limit"
    assert limits.get("memory"), f"{name} has no memory limit"
    assert service["cap_drop"] == ["ALL"]
    assert service["read_only"] is True
    assert TMP in service.get("tmpfs", [])
    assert "no-new-privileges:true" in service.get("security_opt", [])
    assert not service.get("privileged", False)
    assert not service.get("cap_add")


def test_migrate_runs_once_before_every_application_process(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["command"] == ["comptoir", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" not in migrate
    for name in APP_SERVICES:
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name
        assert services[name]["restart"] == "unless-stopped"


def test_the_gateway_starts_after_every_upstream_is_healthy(services: dict[str, dict[str, Any]]) -> None:
    depends_on = services["gateway"]["depends_on"]
    for name in [*UPSTREAMS, "redis"]:
        assert depends_on[name]["condition"] == "service_healthy", name
    env = environment_of(services["gateway"])
    for name in UPSTREAMS:
        assert env[f"GATEWAY_{name.upper()}_URL"] == f"http://{name}:{PORTS[name]}"
    assert env["REDIS_URL"] == "redis://redis:6379/0"


def test_only_the_gateway_reaches_the_outside_network(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert compose["networks"]["backend"]["internal"] is True
    for name, service in services.items():
        expected = {"frontend", "backend"} if name == "gateway" else {"backend"}
        assert set(service["networks"]) == expected, name


def test_browser_origins_reach_auth_from_the_env_file(services: dict[str, dict[str, Any]]) -> None:
    """Without them every cookie refresh of a browser app is refused 403 (this origin may not use the cookie)."""
    assert environment_of(services["auth"])["AUTH_BROWSER_ORIGINS"] == "${AUTH_BROWSER_ORIGINS:-[]}"  # default: none
    rendered = render(COMPOSE_FILE, production_dotenv())["services"]
    assert service_environment(rendered["auth"])["AUTH_BROWSER_ORIGINS"] == '["https://shop.example.com"]'
    others = {name for name, s in services.items() if "AUTH_BROWSER_ORIGINS" in environment_of(s)} - {"auth"}
    assert others <= {"check"}  # the deploy check reads every process's settings


def test_the_services_believe_forwarded_addresses_from_the_gateway_alone(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """Any container of the backend network could otherwise claim any client address to the services."""
    address = services["gateway"]["networks"]["backend"]["ipv4_address"]
    subnet = ipaddress.ip_network(compose["networks"]["backend"]["ipam"]["config"][0]["subnet"])
    assert ipaddress.ip_address(address) in subnet
    for name in UPSTREAMS:
        assert environment_of(services[name])[f"{name.upper()}_GATEWAY_NETWORKS"] == f"{address}/32", name


def test_each_database_password_reaches_only_the_containers_that_need_it(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        # env_file: .env would hand every password of the installation to every container.
        assert "env_file" not in service, name
        env = " ".join(environment_of(service).values())
        passwords = {var for var in [*DB_PASSWORDS.values(), "POSTGRES_PASSWORD"] if "${" + var in env}
        if name in ("migrate", "postgres", *TOOLS):
            continue
        assert passwords == ({DB_PASSWORDS[name]} if name in DB_PASSWORDS else set()), name


@pytest.mark.parametrize("name", UPSTREAMS)
def test_each_service_connects_as_its_own_database_role(services: dict[str, dict[str, Any]], name: str) -> None:
    variable = f"{name.upper()}_DATABASE_URL"
    runtime_url = environment_of(services[name])[variable]
    assert runtime_url.startswith(f"postgresql://comptoir_{name}:${{{DB_PASSWORDS[name]}")
    assert runtime_url.endswith("@postgres:5432/comptoir?sslmode=verify-full")
    # migrate creates the role with exactly the password the service will log in with.
    assert environment_of(services["migrate"])[variable] == runtime_url


def test_dockerfile_final_stage_runs_as_a_non_root_user() -> None:
    users = [argument for keyword, argument in final_stage() if keyword == "USER"]
    assert users, "the final stage sets no USER, so it runs as root"
    assert users[-1].split(":")[0].strip() not in ROOT_USERS


def test_dockerfile_final_stage_starts_the_gateway_by_default() -> None:
    (command,) = [argument for keyword, argument in final_stage() if keyword == "CMD"]
    assert json.loads(command) == [
        "python",
        "-m",
        "comptoir.serve",
        "gateway",
        "--host",
        ALL_INTERFACES,
        "--port",
        "8000",
    ]


def test_dockerfile_installs_pinned_dependencies_without_dev_extras() -> None:
    runs = " ".join(argument for keyword, argument in dockerfile_instructions() if keyword == "RUN")
    assert "pip install -c requirements.lock ." in runs
    assert "[dev]" not in runs


def _declared_names(keyword: str, argument: str) -> list[tuple[str, str]]:
    """(name, value) of an ENV or ARG instruction, in the `a=b c=d` and the legacy `a b` forms."""
    tokens = shlex.split(argument)
    if keyword == "ENV" and tokens and "=" not in tokens[0]:
        return [(tokens[0], " ".join(tokens[1:]))]
    return [(name, value) for name, _, value in (token.partition("=") for token in tokens)]


def test_dockerfile_bakes_in_no_secret() -> None:
    offending = [
        f"{keyword} {name}"
        for keyword, argument in dockerfile_instructions()
        if keyword in ("ENV", "ARG")
        for name, value in _declared_names(keyword, argument)
        if value and any(word in name.upper() for word in SECRET_WORDS)
    ]
    assert offending == []


def test_env_example_declares_every_variable_the_compose_file_reads() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    referenced = {braced or bare for braced, bare in COMPOSE_VARIABLE.findall(text)}
    assert referenced, "the compose file reads no variable; the pattern is broken"
    for example in (ENV_EXAMPLE, PRODUCTION_EXAMPLE):
        assert sorted(referenced - env_example_documents(example)) == [], example


@pytest.mark.parametrize("example", [ENV_EXAMPLE, PRODUCTION_EXAMPLE], ids=["env", "production"])
def test_env_examples_hold_no_secret(example: Path) -> None:
    for name, value in env_example(example).items():
        if any(word in name for word in SECRET_WORDS) and not name.endswith("_LINK"):
            assert value == "", name


def test_env_file_is_never_committed_nor_sent_to_the_builder() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for entry in (".env", ".venv", ".git", "var", "tests", "bench"):
        assert entry in ignored or f"**/{entry}" in ignored, entry


# ---------------------------------------------------------------- rendered: what each container really gets

# The process each container runs, and the settings classes that process reads.
PROCESS_OF = {"migrate": "migrate", "check": "check", **{name: name for name in APP_SERVICES}}
# Read by asyncpg itself (the CA of the database server's certificate), not by a settings class.
LIBPQ_VARIABLES = {"PGSSLROOTCERT"}


def _settings_classes(process: str) -> list[type[Any]]:
    from comptoir.config import RunSettings
    from gateway.config import GatewaySettings
    from services.audit.config import Settings as AuditSettings
    from services.auth.config import Settings as AuthSettings
    from services.inventory.config import Settings as InventorySettings
    from services.orders.config import Settings as OrdersSettings

    every = [RunSettings, GatewaySettings, AuthSettings, InventorySettings, OrdersSettings, AuditSettings]
    return {
        "migrate": [RunSettings],
        "check": every,
        "gateway": [GatewaySettings],
        "auth": [AuthSettings],
        "inventory": [InventorySettings],
        "orders": [OrdersSettings],
        "audit": [AuditSettings],
    }[process]


def names_read_by(process: str) -> set[str]:
    from pydantic import AliasChoices

    names = set()
    for cls in _settings_classes(process):
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names.add(str(alias.choices[0]))
            else:
                names.add((prefix + field_name).upper())
    return names


def generated_secrets() -> dict[str, str]:
    """What `comptoir secrets` prints, parsed as compose parses .env."""
    result = subprocess.run(
        [sys.executable, "-m", "comptoir.cli", "secrets"], capture_output=True, text=True, check=True, timeout=60
    )
    return parse_dotenv(result.stdout)


def production_dotenv() -> dict[str, str]:
    """deploy/production.env.example as an operator fills it: generated secrets appended, the webhook's own."""
    values = parse_dotenv(PRODUCTION_EXAMPLE.read_text(encoding="utf-8"))
    values |= generated_secrets()
    values["AUTH_WEBHOOK_SECRET"] = secrets.token_urlsafe(32)
    return values


def to_loopback(value: str) -> str:
    """Compose's service host names, as a test on one machine reaches them."""
    # A host is followed by its port and then the path, the query or the end; "postgres:" followed by a
    # password that starts with a digit is the user name of postgresql://postgres:<password>@postgres:5432.
    return re.sub(r"(?<=[@/])(postgres|redis|auth|inventory|orders|audit)(?=:\d+(?:[/?,]|$))", "127.0.0.1", value)


def build_app(process: str, env: dict[str, str]) -> Any:
    """The process's own factory (what `python -m comptoir.serve <process>` runs), with exactly ``env``.

    The factory runs the process's start-up checks and, in production, refuses to build on a failing one."""
    from comptoir.serve import FACTORIES

    module, _, factory = FACTORIES[process].partition(":")
    with mock.patch.dict(os.environ, env, clear=True):
        return getattr(importlib.import_module(module), factory)()


@pytest.fixture
def production(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, str]]:
    """Each container's environment, rendered from the production example, ready to run on loopback."""
    monkeypatch.chdir(tmp_path)  # no .env file of the checkout may leak into the settings
    rendered = render(COMPOSE_FILE, production_dotenv())
    envs = {}
    for name in IMAGE_SERVICES:
        env = {key: to_loopback(value) for key, value in service_environment(rendered["services"][name]).items()}
        env["DATA_DIR"] = str(tmp_path / name)  # the container's /data volume
        envs[name] = env
    return envs


def test_the_production_example_renders_with_every_variable_set() -> None:
    rendered = render(COMPOSE_FILE, production_dotenv())
    for name in IMAGE_SERVICES:
        env = service_environment(rendered["services"][name])
        assert env["ENVIRONMENT"] == "production", name
        assert not [key for key, value in env.items() if "$" in value], name


def test_a_missing_secret_stops_compose_with_the_way_to_fix_it() -> None:
    values = production_dotenv()
    del values["AUTH_CLIENT_SECRET"]
    with pytest.raises(InterpolationError, match="AUTH_CLIENT_SECRET.*comptoir secrets"):
        render(COMPOSE_FILE, values)
    with pytest.raises(InterpolationError, match="AUTH_CLIENT_SECRET"):
        render(COMPOSE_FILE, values | {"AUTH_CLIENT_SECRET": ""})


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_each_container_gets_only_settings_its_process_reads(production: dict[str, dict[str, str]], name: str) -> None:
    unknown = set(production[name]) - names_read_by(PROCESS_OF[name]) - LIBPQ_VARIABLES
    assert sorted(unknown) == [], f"{name} receives variables its process never reads"


def test_secrets_reach_only_the_process_that_uses_them(production: dict[str, dict[str, str]]) -> None:
    for name, env in production.items():
        if name in TOOLS:
            continue  # the check tool sees every process's settings (its own test)
        secret_names = {key for key in env if key.endswith(("_CLIENT_SECRET", "SERVICE_CLIENTS", "WEBHOOK_SECRET"))}
        expected = set() if name == "migrate" else {f"{name.upper()}_CLIENT_SECRET"}
        if name == "auth":
            expected |= {"AUTH_SERVICE_CLIENTS", "AUTH_WEBHOOK_SECRET"}
        assert secret_names == expected, name
        assert "BACKUP_ENCRYPTION_KEY" not in env, name
        superuser = [key for key, value in env.items() if "postgres:" in value.split("@")[0]]
        assert superuser == (["DATABASE_URL"] if name == "migrate" else []), name


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_every_database_url_verifies_the_server_certificate(production: dict[str, dict[str, str]], name: str) -> None:
    env = production[name]
    urls = {key: value for key, value in env.items() if key.endswith("DATABASE_URL")}
    assert bool(urls) == (name != "gateway")
    for key, url in urls.items():
        assert parse_qs(urlsplit(url).query)["sslmode"] == ["verify-full"], key
    if urls:
        assert env["PGSSLROOTCERT"] == "/etc/comptoir/postgres-ca/ca.crt"


@pytest.mark.parametrize("process", APP_SERVICES)
def test_each_process_starts_in_production_from_exactly_its_rendered_environment(
    production: dict[str, dict[str, str]], process: str
) -> None:
    """Its own factory runs its own start-up checks; any critical failure would raise UnsafeConfiguration."""
    env = production[process]
    assert env["ENVIRONMENT"] == "production"
    app = build_app(process, env)
    assert app is not None


@pytest.mark.parametrize("process", APP_SERVICES)
def test_the_start_up_check_would_catch_a_missing_secret(production: dict[str, dict[str, str]], process: str) -> None:
    """The test above can fail: without its client secret each process refuses, naming the check."""
    from common.deploychecks import UnsafeConfiguration

    env = {key: value for key, value in production[process].items() if key != f"{process.upper()}_CLIENT_SECRET"}
    with pytest.raises(UnsafeConfiguration, match="CMP-W002"):
        build_app(process, env)


def test_migrate_gets_every_runtime_role_url_and_the_superuser(production: dict[str, dict[str, str]]) -> None:
    from comptoir.config import RunSettings

    with mock.patch.dict(os.environ, production["migrate"], clear=True):
        settings = RunSettings()
    assert urlsplit(settings.database_url).username == "postgres"
    for service in UPSTREAMS:
        assert settings.service_url_override(service) == production[service][f"{service.upper()}_DATABASE_URL"]


def test_the_development_env_example_works_for_make_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """.env.example copied to .env: every process's settings load in development, and the processes build
    from the environment `comptoir run` gives them (the embedded database's socket URLs, generated secrets)."""
    from comptoir.config import RunSettings
    from comptoir.provision import ServiceRole
    from comptoir.supervisor import child_env

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    base = {"PATH": os.environ.get("PATH", "")}
    with mock.patch.dict(os.environ, base, clear=True):
        settings = RunSettings()
        assert settings.environment.value == "development"
        assert settings.database_url == ""  # the embedded server
        roles = [
            ServiceRole(s, f"comptoir_{s}", "pw", f"postgresql://comptoir_{s}:pw@/comptoir?host={tmp_path}")
            for s in UPSTREAMS
        ]
        env = child_env(settings, roles)
    for process in APP_SERVICES:
        app = build_app(process, env)
        assert app is not None, process


def test_the_check_tool_sees_every_process_settings_and_is_never_started_by_up(
    services: dict[str, dict[str, Any]], production: dict[str, dict[str, str]]
) -> None:
    """`comptoir check --deploy` checks all five processes' settings: in one application container it sees
    only that container's, and fails on the others' secrets. The check tool gets the union (through the
    same anchors, so a setting added to a container reaches it too), the superuser URL for the database
    checks and the backup key; a tool, it runs only when asked (`docker compose run --rm check`)."""
    check = services["check"]
    assert check["profiles"] == ["tools"]
    assert check["restart"] == "no"
    assert check["command"] == ["comptoir", "check", "--deploy"]
    assert "ports" not in check
    assert check["depends_on"]["postgres"]["condition"] == "service_healthy"
    union: dict[str, str] = {}
    for name in ["migrate", *APP_SERVICES]:
        union |= {key: value for key, value in production[name].items() if key != "DATA_DIR"}
    tool = {key: value for key, value in production["check"].items() if key != "DATA_DIR"}
    audit_files = {
        "AUDIT_CHECKPOINT_KEY_FILE": "/audit-data/keys/audit-checkpoint.key",
        "AUDIT_CHECKPOINT_LOG_FILE": "/audit-data/audit/checkpoints.jsonl",
    }
    assert tool == union | {"BACKUP_ENCRYPTION_KEY": tool["BACKUP_ENCRYPTION_KEY"]} | audit_files
    # audit's volume, where its checkpoint key and log are, read-only: the check never writes there.
    assert "audit-data:/audit-data:ro" in check["volumes"]
