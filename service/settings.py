"""Service settings, read from environment variables with the ``MMF_`` prefix (or a ``.env`` file)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.index.settings import IndexSettings


class Settings(BaseSettings):
    """Every field can be set as ``MMF_<FIELD>``, e.g. ``MMF_REDIS_URL=redis://localhost:6379/0``; the nested index
    settings (``index``) each by a variable of its own, ``MMF_INDEX`` being the kind (service/index/settings.py)."""

    model_config = SettingsConfigDict(env_prefix="MMF_", env_file=".env", extra="ignore")

    artifacts: Path = Field(Path("artifacts"), description="artifact directory written by `python -m training train`")
    artifacts_watch_s: float = Field(
        0.0,
        ge=0,
        le=86400,
        description="check every this many seconds whether the artifact directory (e.g. the link ROOT/current of "
        "`python -m training train --versioned`) holds another artifact, and hot-reload it; 0 = off (reload with "
        "SIGHUP or POST /admin/reload)",
    )
    redis_url: str | None = Field(None, description="Redis URL; unset = start an embedded Redis under state_dir")
    redis_password_file: Path | None = Field(
        None,
        description="file holding the password of the Redis at MMF_REDIS_URL (a Docker secret); used when the URL "
        "carries none",
    )
    state_dir: Path = Field(Path("state"), description="data directory of the embedded Redis (AOF persistence)")
    redis_appendfsync: Literal["everysec", "always"] = Field(
        "everysec",
        description="embedded Redis: when its append-only file is flushed to disk. everysec: a crash of the host "
        "(power, kernel) can lose about the last second of acknowledged writes; always: none, each write waits "
        "for the disk (a process crash loses nothing with either)",
    )
    namespace: str = Field("mmf", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="prefix of every Redis key")
    api_key: SecretStr | None = Field(
        None,
        description="key required in the X-API-Key header of write requests (at least 8 characters); unset = writes "
        "answer 403; it is replaced by *** in every log line",
    )
    require_key_for_reads: bool = Field(
        False,
        description="also require the API key on read endpoints, /metrics and /openapi.json (the /docs and /redoc "
        "pages are then off: a browser cannot send the key); /healthz and /readyz stay open",
    )
    fast_recommend: bool = Field(
        True,
        description="answer plain GET /recommend requests (training user, bounded index search) in a middleware "
        "in front of FastAPI's router: the same answers at about half the in-process cost; false = all via the route",
    )
    max_k: int = Field(1000, ge=1, description="largest k accepted by /recommend and /similar")
    fresh_slots: int = Field(
        0,
        ge=0,
        description="default of /recommend's `fresh`: how many of the k slots are reserved for the best items "
        "added online within MMF_FRESH_WINDOW_S (0 = off; above 0 every /recommend goes through the route, not the "
        "fast path)",
    )
    fresh_window_s: float = Field(
        86400.0, gt=0, description="how recently (seconds) an item must have been added online to fill a fresh slot"
    )
    max_batch: int = Field(1000, ge=1, description="largest number of items in one batch insert")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest accepted request body")
    # -- connections (service/protocol.py; uvicorn) ----------------------------------------------------------
    max_header_bytes: int = Field(
        64 * 1024, ge=4096, le=16 * 1024 * 1024,
        description="largest request line plus headers; a larger request is answered 431 and its connection closed",
    )  # fmt: skip
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600,
        description="a connection must deliver a request's complete headers within this many seconds of opening "
        "(or of the request's first byte on a kept-alive connection): else 408 and closed",
    )  # fmt: skip
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a request's complete body must arrive within this many seconds of its headers"
    )  # fmt: skip
    keep_alive_s: float = Field(5.0, gt=0, le=3600, description="an idle kept-alive connection is closed after this")
    worker_healthcheck_s: float = Field(
        60.0, gt=0, le=3600,
        description="with --workers > 1: how long uvicorn's supervisor waits for a worker's answer to its health "
        "ping before it kills and restarts the worker (uvicorn's default, 5 s, killed workers still importing torch "
        "on a loaded host)",
    )  # fmt: skip
    max_connections: int = Field(
        1000, ge=1, le=1_000_000,
        description="per process: beyond this many open connections (or running requests), requests are answered 503",
    )  # fmt: skip
    cors_origins: list[str] = Field(
        default_factory=list,
        description="origins allowed by CORS (JSON list; methods GET, POST, DELETE; headers X-API-Key, Content-Type)",
    )
    follow_block_ms: int = Field(200, ge=10, description="how long a replica blocks on the Redis event stream")
    stream_max_len: int = Field(
        1_000_000,
        ge=1000,
        description="approximate cap on the event stream that replicas follow (a replica that falls further behind "
        "reloads its state from Redis)",
    )
    index: Annotated[IndexSettings, NoDecode] = Field(
        default_factory=IndexSettings,
        description="the item index (service/index/settings.py), each setting a variable of its own: MMF_INDEX (the "
        "kind), MMF_HNSW_M, ...",
    )
    torch_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="torch intra-op threads of every thread fusing new items or embedding new users: requests "
        "carry one item or user, and on a busy machine more threads make a fusion's p99 several times worse "
        '(OpenMP waits; docs/performance.md, "The `/recommend` fast path and one torch thread")',
    )
    batch_torch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="torch intra-op threads while fusing a batch of 32 items or more (POST /items:batch, online items "
        "fused again after a reload): its products with the trained items' content keys are bulk work that more "
        "threads speed up; 0 = the CPUs this process may use",
    )
    precomputed_k: int = Field(
        100,
        ge=0,
        le=10_000,
        description="exact top-k lists of this length for every training user, computed at start-up and after a "
        "reload (users x items inner products, on MMF_INDEX_BUILD_THREADS threads): /recommend answers from them "
        "plus the best items added online (filed per user at write time, MMF_ONLINE_CANDIDATES_MAX_USERS, or searched "
        "in an index of their own), and searches the whole index only when a list runs out; 0 = off",
    )
    precomputed_max_pairs: int = Field(
        20_000_000_000,
        ge=0,
        description="no precomputed lists when users x items is larger (the start-up cost grows with it: about 90 s "
        "for 20,000 users x 1M items on 2 cores)",
    )
    online_candidates_max_users: int = Field(
        100_000,
        ge=0,
        description="with precomputed lists and at most this many training users, each write scores its items "
        "against every training user and files them with the users whose list they may enter: /recommend then "
        "reads them there, exactly and whatever the number of online items; above it (each write would cost "
        "users x items inner products) every request searches the online items' index; 0 = off",
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, key: object) -> object:
        # MMF_API_KEY= (compose's ${MMF_API_KEY:-} without a key) means no key: writes answer 403
        return None if key == "" else key

    @field_validator("api_key")
    @classmethod
    def _long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        # The message never holds the value (pydantic's would echo it): see load_settings.
        if key is not None and len(key.get_secret_value()) < 8:
            raise ValueError("at least 8 characters")
        return key

    @model_validator(mode="after")
    def _password_into_url(self) -> Settings:
        # The URL is what every client is built from; a password in a file (not in the environment, where
        # `docker inspect` shows it) joins it here, percent-encoded.
        if self.redis_password_file is None or self.redis_url is None:
            return self
        parts = urlsplit(self.redis_url)
        if parts.password is not None:
            return self
        try:
            password = self.redis_password_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"MMF_REDIS_PASSWORD_FILE: cannot read the file ({exc.strerror})") from None
        if not password:
            raise ValueError("MMF_REDIS_PASSWORD_FILE: the file is empty")
        netloc = f"{quote(parts.username or '', safe='')}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
        self.redis_url = urlunsplit(parts._replace(netloc=netloc))
        return self

    @model_validator(mode="before")
    @classmethod
    def _gather_index_settings(cls, values: Any) -> Any:
        # The index settings are set flat (MMF_HNSW_M=..., or hnsw_m=... as an argument), MMF_INDEX being the
        # kind; they are validated as the nested ``index`` model.
        if not isinstance(values, dict):
            return values
        values = dict(values)
        nested = values.pop("index", {})
        if isinstance(nested, IndexSettings):
            nested = nested.model_dump(by_alias=True, exclude_unset=True)
        elif not isinstance(nested, dict):
            nested = {"index": nested}
        flat = {name: values.pop(name) for name in IndexSettings.variables() if name in values}
        if nested or flat:
            values["index"] = {**nested, **flat}
        return values

    @property
    def batch_thread_count(self) -> int:
        """Threads fusing a batch: ``batch_torch_threads``, 0 = the CPUs this process may use (affinity, cgroup
        quota)."""
        from models.hardware import usable_cpus

        return self.batch_torch_threads or usable_cpus()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The .env file hands on variables that are no field as they are; the environment needs this source.
        index_variables = IndexVariables(settings_cls)
        return init_settings, env_settings, index_variables, dotenv_settings, file_secret_settings


class IndexVariables(EnvSettingsSource):
    """The index settings' variables in the environment (``MMF_HNSW_M``, ...), flat, for
    ``Settings._gather_index_settings``: the plain environment source reads fields of Settings only."""

    def __call__(self) -> dict[str, str]:
        found = {}
        for name in IndexSettings.variables():
            variable = self.env_prefix + name
            value = self.env_vars.get(variable if self.case_sensitive else variable.lower())
            if value is not None:
                found[name] = value
        return found


class SettingsError(ValueError):
    """Invalid settings; the message names each bad ``MMF_*`` variable and why, never its value."""


def load_settings(**overrides: object) -> Settings:
    """``Settings`` from the environment (and ``overrides``). A ValidationError's text echoes the input, and for
    a check across fields the input is every setting, the API key included: it is replaced by a SettingsError
    that names the variables only."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False, include_context=False):
            loc = error["loc"][1:] if error["loc"][:1] == ("index",) else error["loc"]  # index settings: flat names
            where = "MMF_" + "_".join(str(part) for part in loc).upper() if loc else "settings"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


def shown_default(value: object) -> str:
    """A setting's default as an operator would write it in the environment (``unset`` for none)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, list) else str(value)


def documented_fields() -> Iterator[tuple[str, FieldInfo]]:
    """(variable name without ``MMF_``, field) of every setting, the index settings in place of ``index``."""
    for name, field in Settings.model_fields.items():
        if name == "index":
            yield from zip(IndexSettings.variables(), IndexSettings.model_fields.values(), strict=True)
        else:
            yield name, field


def settings_markdown() -> str:
    """The table of every setting (variable, default, meaning) from the fields of :class:`Settings`: the one in
    docs/configuration.md, written by ``python tools/settings_doc.py``."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in documented_fields():
        default = shown_default(field.get_default(call_default_factory=True))
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `MMF_{name.upper()}` | `{default}` | {meaning} |")
    return "\n".join(rows) + "\n"
