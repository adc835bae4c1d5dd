"""The deployment files: docker-compose.yml wiring and the Dockerfiles' essentials."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_redis_with_aof_then_trainer_then_api() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "trainer", "api", "proxy"}
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    api = services["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert api["environment"]["MMF_REDIS_URL"].startswith("redis://redis:")
    # trainer writes the volume the API reads, read-only there
    assert any(v.startswith("artifacts:/artifacts") and not v.endswith(":ro") for v in services["trainer"]["volumes"])
    assert "artifacts:/artifacts:ro" in api["volumes"]
    # one stable entry point (the proxy) in front of the replicas, on the loopback interface by default; the
    # replicas publish nothing, so `--scale api=3` needs no port range
    assert "ports" not in api and api["expose"] == ["8000"]
    proxy = services["proxy"]
    assert proxy["ports"] == ["${MMF_BIND:-127.0.0.1}:${MMF_PORT:-8000}:8080"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    # no default write key (empty: the service starts read-only), and time to stop cleanly
    assert api["environment"]["MMF_API_KEY"] == "${MMF_API_KEY:-}"
    assert api["stop_grace_period"] == "30s"


def test_an_empty_api_key_means_read_only(monkeypatch) -> None:
    from service.settings import SettingsError, load_settings

    monkeypatch.setenv("MMF_API_KEY", "")
    assert load_settings().api_key is None
    monkeypatch.setenv("MMF_API_KEY", "short")
    with pytest.raises(SettingsError, match="MMF_API_KEY: at least 8 characters"):
        load_settings()


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.train"])
def test_images_install_the_locked_versions(name: str) -> None:
    text = (ROOT / "docker" / name).read_text()
    assert "COPY requirements.lock" in text and "pip install -r requirements.lock" in text
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert "pip install --no-deps ." in text
    pinned = {line.split("==")[0]: line.split("==")[1] for line in (ROOT / "requirements.lock").read_text().splitlines()
              if "==" in line and not line.startswith("#")}  # fmt: skip
    assert pinned["torch"] == "2.13.0"


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.train", "Dockerfile.proxy"])
def test_images_run_as_non_root_and_exist_for_compose(name: str) -> None:
    text = (ROOT / "docker" / name).read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    dockerfiles = {s["build"]["dockerfile"] for s in compose()["services"].values() if "build" in s}
    assert f"docker/{name}" in dockerfiles


@pytest.mark.parametrize(("name", "start_period"), [("Dockerfile.api", 600), ("Dockerfile.proxy", 60)])
def test_served_images_have_a_healthcheck(name: str, start_period: int) -> None:
    """A health check with a start period long enough for a loaded host (failures before it do not count)."""
    line = next(line for line in (ROOT / "docker" / name).read_text().splitlines() if line.startswith("HEALTHCHECK"))
    options = dict(part.removeprefix("--").split("=") for part in line.split() if part.startswith("--"))
    assert int(options["start-period"].rstrip("s")) >= start_period and int(options["timeout"].rstrip("s")) >= 10


def test_proxy_bounds_requests_like_the_service() -> None:
    """The entry point's limits are the service's defaults (body, header time, body time, keep-alive)."""
    from service.settings import Settings

    conf = (ROOT / "docker" / "proxy" / "nginx.conf").read_text()
    defaults = Settings.model_fields
    assert f"client_max_body_size {defaults['max_body_bytes'].default // 2**20}m;" in conf
    assert f"client_header_timeout {defaults['header_timeout_s'].default:g}s;" in conf
    assert f"client_body_timeout {defaults['body_timeout_s'].default:g}s;" in conf
    assert f"keepalive_timeout {defaults['keep_alive_s'].default:g}s;" in conf
    assert "resolver 127.0.0.11" in conf and "proxy_pass $api;" in conf  # replicas found at request time


def test_compose_config_validates_with_a_docker_client() -> None:
    """`docker compose config` (v2 plugin) or `docker-compose config` (v1), whichever is installed."""
    docker = shutil.which("docker")
    has_v2 = docker is not None and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    if shutil.which("docker-compose"):
        cmd = ["docker-compose", "config", "-q"]
    elif has_v2:
        cmd = ["docker", "compose", "config", "-q"]
    else:
        pytest.skip("no docker compose client installed")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_check_script_parses_and_is_the_make_target() -> None:
    """`make compose-check` runs docker/compose_check.sh (it needs an engine, so CI only checks its syntax)."""
    script = ROOT / "docker" / "compose_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    makefile = (ROOT / "Makefile").read_text()
    assert "compose-check:\n\tbash docker/compose_check.sh" in makefile
    text = script.read_text()
    for needle in ("--scale api=3", "exited with status 0", "after the restart", "without the key"):
        assert needle in text
