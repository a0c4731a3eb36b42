"""`ServeConfig`: everything `t2v serve` is told, and the one home of its defaults.

A plain dataclass with no heavy imports, so that the CLI can show these defaults in --help
without loading FastAPI, and the queue can take its bound from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_BLOCKLIST = Path(__file__).with_name("blocklist.txt")  # read by t2v.serve.filter


@dataclass
class ServeConfig:
    """Everything `t2v serve` is told; the CLI's options map onto these fields one to one."""

    data_dir: Path
    model_dir: Path | None = None  # None: the bundled model
    device: str = "auto"
    precision: str = "fp32"
    offload: str = "none"
    host: str = "127.0.0.1"
    port: int = 8000
    auth: bool = False
    queue_size: int = 100
    rate_limit: int = 30  # new jobs per API key per minute; 0: no limit
    blocklist: Path = DEFAULT_BLOCKLIST  # an empty file: no content filter
    allowed_hosts: tuple[str, ...] = ()
    public_urls: tuple[str, ...] = ()  # origins of the page behind a proxy, e.g. https://t2v.org
    drain_timeout: float = 30.0
    db: str | None = None  # postgresql://... shared by nodes and workers; None: SQLite
    workers: int = 1  # jobs run at once in this process; 0: the API only
    default_model: str | None = None  # a job naming none: this; else see routes.Served
