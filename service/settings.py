"""Service settings, read from environment variables with the ``MMF_`` prefix (or a ``.env`` file)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every field can be set as ``MMF_<FIELD>``, e.g. ``MMF_REDIS_URL=redis://localhost:6379/0``."""

    model_config = SettingsConfigDict(env_prefix="MMF_", env_file=".env", extra="ignore")

    artifacts: Path = Field(Path("artifacts"), description="artifact directory written by `python -m training train`")
    redis_url: str | None = Field(None, description="Redis URL; unset = start an embedded Redis under state_dir")
    state_dir: Path = Field(Path("state"), description="data directory of the embedded Redis (AOF persistence)")
    namespace: str = Field("mmf", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="prefix of every Redis key")
    api_key: SecretStr | None = Field(None, description="key required in the X-API-Key header of write requests")
    require_key_for_reads: bool = Field(False, description="also require the API key on read endpoints")
    max_k: int = Field(1000, ge=1, description="largest k accepted by /recommend and /similar")
    max_batch: int = Field(1000, ge=1, description="largest number of items in one batch insert")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest accepted request body")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (JSON list)")
    follow_block_ms: int = Field(200, ge=10, description="how long a replica blocks on the Redis event stream")
    stream_max_len: int = Field(1_000_000, ge=1000, description="approximate cap on the event stream length")
