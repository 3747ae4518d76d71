"""Apply and revert the alembic revisions in ``alembic/`` over an async admin connection."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy import Connection

from alembic import command
from models.db import create_engine

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"


def alembic_config() -> Config:
    if not (ALEMBIC_DIR / "env.py").exists():
        raise RuntimeError(f"alembic scripts not found at {ALEMBIC_DIR}; run Atrium from its source tree")
    cfg = Config(str(ALEMBIC_DIR.parent / "alembic.ini"))
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    return cfg


async def migrate(admin_url: str, revision: str = "head", *, downgrade: bool = False) -> None:
    """Upgrade (or downgrade) the database at ``admin_url`` to ``revision``; each revision commits."""

    def run(connection: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        if downgrade:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)

    engine = create_engine(admin_url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(run)
            await conn.commit()
    finally:
        await engine.dispose()
