"""deploy/kubernetes: valid Kubernetes objects that agree with the image and the app they run.

Validated against the API schemas ``kubernetes-validate`` ships (strict: unknown fields fail), as
no cluster is available here; then checked against the Dockerfile, the CLI and the running app.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from atrium.asgi import create_from_env
from atrium.cli.main import parser
from core.settings import app_role_url
from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.31.0"
"""Oldest Kubernetes release the manifests must be valid for."""
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SETTINGS = (ROOT / "core" / "settings.py").read_text()


def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs[path.name] = yaml.safe_load(path.read_text())
    return docs


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = manifests()[name]["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifest_is_a_valid_kubernetes_object(name: str) -> None:
    kubernetes_validate.validate(manifests()[name], KUBERNETES, strict=True)


def test_kustomization_applies_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(manifests())
    images = {image["name"] for image in kustomization["images"]}
    for name in ("deployment.yaml", "migrate-job.yaml"):
        assert {c["image"] for c in pod_spec(name)["containers"]} <= images


def test_api_pods_run_the_image_command_as_the_image_user() -> None:
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M).group(1))  # type: ignore[union-attr]
    [api] = pod_spec("deployment.yaml")["containers"]
    assert api["command"][:len(cmd)] == cmd, "the Dockerfile's CMD, perhaps with more options"
    port = int(re.search(r"^EXPOSE (\d+)$", DOCKERFILE, re.M).group(1))  # type: ignore[union-attr]
    assert [p["containerPort"] for p in api["ports"]] == [port]
    uid = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)
    assert uid is not None, "a numeric USER, which runAsNonRoot can verify"
    for name in ("deployment.yaml", "migrate-job.yaml"):
        pod = pod_spec(name)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
            int(uid.group(1)), int(uid.group(2)))
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            # A read-only image writes only to /tmp, where the image keeps its data directory.
            assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    assert "ATRIUM_DATA_DIR=/tmp/" in DOCKERFILE


def test_every_environment_variable_is_a_setting() -> None:
    for name in ("deployment.yaml", "migrate-job.yaml"):
        for container in pod_spec(name)["containers"]:
            for variable in container["env"]:
                assert f'"{variable["name"]}"' in SETTINGS, f"{name}: {variable['name']} is read by no setting"
    api_env = {v["name"] for v in pod_spec("deployment.yaml")["containers"][0]["env"]}
    assert "DATABASE_URL" not in api_env, "API pods connect as atrium_app only; the owner's URL is the job's"


def test_migration_job_runs_the_cli() -> None:
    [migrate] = pod_spec("migrate-job.yaml")["containers"]
    assert migrate["command"][:3] == ["python", "-m", "atrium"]
    assert parser().parse_args(migrate["command"][3:]).command == "migrate"


async def test_probes_ask_routes_the_app_serves(client: httpx.AsyncClient) -> None:
    [api] = pod_spec("deployment.yaml")["containers"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        response = await client.get(api[probe]["httpGet"]["path"])
        assert response.status_code == 200, (probe, response.text)


async def test_the_server_needs_only_the_application_role(database_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """What the API pods get: ATRIUM_APP_DATABASE_URL and no owner URL."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("ATRIUM_APP_DATABASE_URL", app_role_url(database_url))
    monkeypatch.setenv("ATRIUM_ENV", "production")
    monkeypatch.setenv("ATRIUM_JWT_SECRET", TEST_SECRET)
    monkeypatch.setenv("ATRIUM_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        app = create_from_env()  # also configures JSON logging: restored below
        async with (app.router.lifespan_context(app),
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pod") as client):
            assert (await client.get("/readyz")).json() == {"status": "ready"}
    finally:
        root.handlers[:], root.level = handlers, level
    monkeypatch.delenv("ATRIUM_APP_DATABASE_URL")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # one line naming what is missing (atrium.asgi.refuse)
        create_from_env()
    assert exited.value.code == 2
    assert "ATRIUM_APP_DATABASE_URL or DATABASE_URL" in capsys.readouterr().err
