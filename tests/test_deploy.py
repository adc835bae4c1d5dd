"""The deployment files: docker-compose.yml wiring and the Dockerfiles' essentials."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.patience import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_stages(name: str) -> dict[str, str]:
    """Stage name -> its text (FROM line to the next FROM) of docker/<name>."""
    stages: dict[str, str] = {}
    current = None
    for line in (ROOT / "docker" / name).read_text().splitlines():
        if line.startswith("FROM "):
            parts = line.split()
            current = parts[3] if len(parts) > 3 and parts[2].upper() == "AS" else f"stage{len(stages)}"
            stages[current] = ""
        if current is not None:
            stages[current] += line + "\n"
    return stages


def test_compose_runs_secrets_redis_trainer_api_and_the_entry_point() -> None:
    services = compose()["services"]
    assert set(services) == {"secrets", "redis", "trainer", "api", "proxy"}
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    # a password: the generated config file (requirepass) first, the health check authenticates with it
    assert redis_cmd[:2] == ["redis-server", "/run/mmf/redis.conf"]
    assert "requirepass" in services["secrets"]["command"][2]
    assert "/run/mmf/redis-password" in services["redis"]["healthcheck"]["test"][1]
    assert services["redis"]["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
    api = services["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert api["environment"]["MMF_REDIS_URL"].startswith("redis://redis:")
    assert api["environment"]["MMF_REDIS_PASSWORD_FILE"] == "/run/mmf/redis-password"
    assert "secrets:/run/mmf:ro" in api["volumes"] and "secrets:/run/mmf:ro" in services["redis"]["volumes"]
    # the trainer writes versions to the volume the API reads (read-only) and follows
    assert any(v.startswith("artifacts:/artifacts") and not v.endswith(":ro") for v in services["trainer"]["volumes"])
    assert "artifacts:/artifacts:ro" in api["volumes"]
    assert api["environment"]["MMF_ARTIFACTS"] == "/artifacts/current"
    assert float(api["environment"]["MMF_ARTIFACTS_WATCH_S"]) > 0
    # one stable entry point (the proxy) in front of the replicas, on the loopback interface by default; the
    # replicas publish nothing, so `--scale api=3` needs no port range
    assert "ports" not in api and api["expose"] == ["8000"]
    proxy = services["proxy"]
    assert proxy["ports"] == ["${MMF_BIND:-127.0.0.1}:${MMF_PORT:-8000}:8080"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    # no default write key (empty: the service starts read-only), and time to stop cleanly
    assert api["environment"]["MMF_API_KEY"] == "${MMF_API_KEY:-}"
    assert api["stop_grace_period"] == "30s"


def test_compose_file_is_consistent() -> None:
    """What `docker compose config` would catch, without a Docker client (CI has none): every named volume is
    declared, every dependency is a service, every build target is a stage of its Dockerfile, and variables use
    only the forms compose v1 and v2 both read."""
    spec = compose()
    services, volumes = spec["services"], spec["volumes"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("$", ".", "/")):
                assert source in volumes, f"{name}: volume {source} is not declared"
        assert set(service.get("depends_on", {})) <= set(services), name
        build = service.get("build")
        if build and "target" in build:
            assert build["target"] in dockerfile_stages(Path(build["dockerfile"]).name), name
    text = (ROOT / "docker-compose.yml").read_text()
    for expression in re.findall(r"(?<!\$)\$\{([^}]*)\}", text):
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?", expression), expression


def test_images_are_tagged_with_the_project_version() -> None:
    """Reproducible tags: each built image is named with the version of pyproject.toml (MMF_IMAGE_TAG overrides)."""
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for name, service in compose()["services"].items():
        if "build" in service:
            assert service["image"] == f"metammf-{name}:${{MMF_IMAGE_TAG:-{version}}}", name


def test_an_empty_api_key_means_read_only(monkeypatch) -> None:
    from service.settings import SettingsError, load_settings

    monkeypatch.setenv("MMF_API_KEY", "")
    assert load_settings().api_key is None
    monkeypatch.setenv("MMF_API_KEY", "short")
    with pytest.raises(SettingsError, match="MMF_API_KEY: at least 8 characters"):
        load_settings()


def test_the_redis_password_file_joins_the_url(monkeypatch, tmp_path: Path) -> None:
    from service.cli import redact
    from service.settings import SettingsError, load_settings

    secret = tmp_path / "redis-password"
    secret.write_text("p@ss/word:1\n")
    monkeypatch.setenv("MMF_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("MMF_REDIS_PASSWORD_FILE", str(secret))
    url = load_settings().redis_url
    assert url == "redis://:p%40ss%2Fword%3A1@redis:6379/0" and redact(url) == "redis://:***@redis:6379/0"
    import redis

    assert redis.connection.parse_url(url)["password"] == "p@ss/word:1"
    monkeypatch.setenv("MMF_REDIS_URL", "redis://:inline@redis:6379/0")  # a password in the URL wins
    assert load_settings().redis_url == "redis://:inline@redis:6379/0"
    monkeypatch.setenv("MMF_REDIS_URL", "redis://redis:6379/0")
    for content, reason in (("", "the file is empty"), (None, "cannot read the file")):
        secret.unlink(missing_ok=True)
        if content is not None:
            secret.write_text(content)
        with pytest.raises(SettingsError, match=f"MMF_REDIS_PASSWORD_FILE: {reason}"):
            load_settings()


def test_images_install_the_locked_versions() -> None:
    deps = dockerfile_stages("Dockerfile")["deps"]
    assert "COPY requirements.lock" in deps and "pip install -r /tmp/requirements.lock" in deps
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in deps
    assert "pip check" in deps
    pinned = {line.split("==")[0]: line.split("==")[1] for line in (ROOT / "requirements.lock").read_text().splitlines()
              if "==" in line and not line.startswith("#")}  # fmt: skip
    assert pinned["torch"] == "2.13.0"


def test_the_api_image_holds_what_serving_needs_only() -> None:
    """Multi-stage: the API stage copies the locked environment and models/ + service/; no training code, no
    compilers, no pip install of the project (the service never imports training: tested below)."""
    stages = dockerfile_stages("Dockerfile")
    copies = [line.split()[1] for line in stages["api"].splitlines() if line.startswith("COPY")]
    assert copies == ["models", "service"]
    assert "COPY --from=deps /opt/mmf /opt/mmf" in stages["runtime"]
    assert "FROM runtime AS api" in stages["api"] and "pip install" not in stages["runtime"] + stages["api"]


def test_the_service_runs_without_the_training_package(tmp_path: Path) -> None:
    """What the API image holds (models/ and service/): `python -m service --help` works, and a missing
    artifact is one clear line (exit 2), not an ImportError."""
    # The project is installed in this environment (editable): an import hook hides the training package.
    hide_training = (
        "import importlib.abc, runpy, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'training' or name.startswith('training.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "sys.argv = ['service', 'run']\n"
        "runpy.run_module('service', run_name='__main__', alter_sys=True)\n"
    )
    env = {**os.environ, "MMF_ARTIFACTS": str(tmp_path / "none")}
    run = subprocess.run([sys.executable, "-c", hide_training], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)  # fmt: skip
    assert run.returncode == 2 and "the training code is not installed" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("stage", ["trainer", "api"])
def test_images_run_as_non_root(stage: str) -> None:
    lines = dockerfile_stages("Dockerfile")[stage].splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}


def test_proxy_image_runs_as_non_root() -> None:
    text = (ROOT / "docker" / "Dockerfile.proxy").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert compose()["services"]["proxy"]["build"]["dockerfile"] == "docker/Dockerfile.proxy"


@pytest.mark.parametrize(("text", "start_period"), [("api", 600), ("Dockerfile.proxy", 60)])
def test_served_images_have_a_healthcheck(text: str, start_period: int) -> None:
    """A health check with a start period long enough for a loaded host (failures before it do not count)."""
    source = dockerfile_stages("Dockerfile")["api"] if text == "api" else (ROOT / "docker" / text).read_text()
    line = next(line for line in source.splitlines() if line.startswith("HEALTHCHECK"))
    options = dict(part.removeprefix("--").split("=") for part in line.split() if part.startswith("--"))
    assert int(options["start-period"].rstrip("s")) >= start_period and int(options["timeout"].rstrip("s")) >= 10


def test_dockerignore_keeps_data_artifacts_and_environments_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "artifacts", "state", "results", "data", ".env"} <= ignored  # .env: the write key


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
