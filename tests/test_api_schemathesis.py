"""schemathesis against the live OpenAPI spec of a running exporter: no 5xx, and every answer
conforms to the spec (status code, content type, headers, body schema).

The server is parametrized by :data:`VARIANTS`: each gives the extra middleware/config of an
exporter and the headers a client sends. An auth-enabled variant adds its credentials there.
"""

from __future__ import annotations

import base64
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from exporter.app import App
from tests.test_api import api_config
from tests.test_pipeline import wait_for

pytestmark = pytest.mark.root


@dataclass(frozen=True)
class Variant:
    """One way to run the exporter: auth files it is configured with (made with Apache's own
    htpasswd/htdigest), and the credentials a client sends."""

    basic_user: str | None = None
    password: str = "s3cret pass"


VARIANTS = [pytest.param(Variant(), id="no-auth"), pytest.param(Variant(basic_user="scraper"), id="basic-auth")]

# Bounded: a handful of examples per operation and mode keeps the whole run well under a minute.
EXAMPLES = 10
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            # A well-formed name of a container that does not exist is a 404, not a rejection
            # of valid data.
            "positive_data_acceptance": {"expected-statuses": ["2xx", "404"]},
        },
    }
)


@dataclass
class LiveApi:
    url: str
    headers: dict[str, str]
    auth: bool


@pytest.fixture(scope="module", params=VARIANTS)
def live_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    """The exporter's own server (app.api), routers and middleware as the config asks."""
    variant: Variant = request.param
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if variant.basic_user:
        htpasswd = tmp / "htpasswd"
        subprocess.run(["htpasswd", "-cbB", str(htpasswd), variant.basic_user, variant.password], check=True, capture_output=True)
        extra["http_auth_file"] = str(htpasswd)
        token = base64.b64encode(f"{variant.basic_user}:{variant.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    config = api_config(tmp, enable_profiling=True, **extra)
    app = App(config)
    app.start()
    try:
        assert app.api is not None
        wait_for(lambda: app.cache.latest("/"), 10.0, "a first record of the root container")
        yield LiveApi(f"http://127.0.0.1:{app.api.port}", headers, bool(variant.basic_user))
    finally:
        app.stop(deadline_s=1.0)


def load_schema(live: LiveApi) -> Any:
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=CONFIG, headers=live.headers, timeout=10)
    # A profile takes the seconds it is asked for (up to 60); tracemalloc would slow the rest of
    # the run: both are covered by tests/test_api.py.
    return schema.exclude(path_regex=r"^/debug/(profile|memory)")


def test_openapi_spec_lists_the_cadvisor_api(live_api: LiveApi):
    spec = httpx.get(f"{live_api.url}/openapi.json", headers=live_api.headers).json()
    paths = set(spec["paths"])
    for path in (
        "/healthz", "/api/v1.3/containers/{name}", "/api/v1.3/subcontainers/{name}", "/api/v1.3/docker/{name}",
        "/api/v1.3/machine", "/api/v2.0/version", "/api/v2.0/attributes", "/api/v2.0/machine", "/api/v2.0/stats/{name}",
        "/api/v2.0/spec/{name}", "/api/v2.0/summary/{name}", "/api/v2.0/ps/{name}", "/api/v2.1/stats/{name}",
        "/api/v2.1/machinestats", "/debug/threads",
    ):
        assert path in paths, path


def expressible(case: schemathesis.Case) -> bool:
    """Valid by the spec and by the one rule it cannot state: type=docker with recursive=true
    lists every Docker container and takes no name (400 otherwise, as cAdvisor's error)."""
    query = case.query or {}
    recursive = str(query.get("recursive", "")).lower() in ("true", "1", "yes", "on")
    name = (case.path_parameters or {}).get("name", "")
    return not (query.get("type") == "docker" and recursive and str(name).strip("/"))


def fuzz(strategy: Any, session: requests.Session, headers: dict[str, str], tally: Counter[int]) -> None:
    """Send up to EXAMPLES requests drawn from ``strategy``; every answer must pass all checks."""

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(session=session, headers=headers, timeout=30)
        tally[response.status_code] += 1

    run()


def test_api_conforms_to_its_spec(live_api: LiveApi) -> None:
    """Every operation, with valid and with invalid data.

    schemathesis's pytest plugin (``from_fixture``) does not run under pytest 9, so the
    operations are driven through its Python API: one Hypothesis run per operation and mode,
    failures collected and reported together.
    """
    schema = load_schema(live_api)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30, [op.label for op in operations]
    failures: list[str] = []
    no_invalid_input = 0
    statuses = {mode: Counter[int]() for mode in GenerationMode}
    with requests.Session() as session:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode)
                if mode is GenerationMode.POSITIVE:
                    strategy = strategy.filter(expressible)
                try:
                    fuzz(strategy, session, live_api.headers, statuses[mode])
                except Unsatisfiable:
                    # Nothing about this operation can be invalid (no parameters, or only a
                    # free-form name): there is no negative case to send.
                    assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid request can be generated"
                    no_invalid_input += 1
                except Exception as exc:  # noqa: BLE001 - collected, reported below
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, f"{len(failures)} operations failed:\n\n" + "\n\n".join(failures)
    positive, negative = statuses[GenerationMode.POSITIVE], statuses[GenerationMode.NEGATIVE]
    # Not a run of 404s: valid requests were served, invalid ones refused as bad requests.
    assert positive[200] >= len(operations), statuses
    assert negative[400] >= 10, statuses
    assert no_invalid_input < len(operations) / 2  # most operations take parameters that can be wrong
    print(f"schemathesis: {positive.total() + negative.total()} requests; {no_invalid_input} operations take no invalid input; {statuses}")


def test_credentials_are_required_exactly_when_auth_is_on(live_api: LiveApi) -> None:
    """With auth on, every operation of the spec (and /metrics, the events API) refuses a
    client without credentials and /healthz stays open; with auth off nothing asks for them."""
    spec = httpx.get(f"{live_api.url}/openapi.json", headers=live_api.headers).json()
    paths = ["/openapi.json"] + [p.replace("{name}", "") for p in spec["paths"]] + ["/metrics", "/api/v1.3/events/", "/api/v2.0/events/"]
    assert len(paths) > 15
    for path in paths:
        if path.startswith("/debug/profile"):
            continue  # takes the seconds it is asked for
        response = httpx.get(f"{live_api.url}{path}", timeout=30)
        if path == "/healthz" or not live_api.auth:
            assert response.status_code != 401, path
        else:
            assert response.status_code == 401, (path, response.status_code)
            assert response.headers["www-authenticate"].startswith("Basic")
    # with the credentials, served
    assert httpx.get(f"{live_api.url}/metrics", headers=live_api.headers).status_code == 200
