"""`mstar keys list` and `mstar keys revoke` as an operator runs them (real processes, settings from MSTAR_*
variables) against a real job database (SQLite and PostgreSQL), and the gateway's answer to a revoked key.

Before, `mstar keys` had only `create`: a key could not be revoked with the shipped tooling, and a key revoked in
SQL came back at the next start while still listed in `MSTAR_API_KEYS` (`install_api_key` reset `revoked`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from services import fresh_database, postgres_url  # noqa: F401  (session fixture: a real PostgreSQL server)

from service.api import create_app
from service.config import Settings

MSTAR = str(Path(sys.executable).with_name("mstar"))
BOOT = "bootstrap-key-for-revoke-0123456789"  # configured in MSTAR_API_KEYS
CACHE_S = 0.5


def _mstar(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MSTAR, "keys", *args], env=env, capture_output=True, text=True, timeout=120)


def _status(client: TestClient, key: str) -> int:
    return client.get("/slides", headers={"Authorization": f"Bearer {key}"}).status_code


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path: Path) -> tuple[dict, Settings]:
    """The `mstar` environment and the gateway's settings, both naming one database."""
    data = tmp_path / "data"
    url = None
    if request.param == "postgresql":
        url = fresh_database(request.getfixturevalue("postgres_url"), "keys_revoke")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTAR_")}
    env.update(MSTAR_DATA_DIR=str(data), MSTAR_LOG_LEVEL="warning")
    if url:
        env["MSTAR_DATABASE_URL"] = url
    settings = Settings(
        data_dir=data,
        database_url=url,
        pipeline="runner_pipelines:tiny",
        runner_workers=1,
        runner_poll_s=0.2,
        auth_cache_s=CACHE_S,
        api_keys=[{"tenant": "boot", "key": BOOT}],
    )
    return env, settings


def test_revoked_keys_are_refused_and_stay_revoked_after_a_restart(database, tmp_path: Path) -> None:
    env, settings = database
    lab = _mstar(env, "create", "--tenant", "lab")
    ops = _mstar(env, "create", "--tenant", "ops", "--admin")
    assert lab.returncode == ops.returncode == 0, lab.stderr + ops.stderr
    lab_key, ops_key = lab.stdout.strip(), ops.stdout.strip()
    lab_prefix = re.fullmatch(r"mstar_([0-9a-f]{12})_\S+", lab_key).group(1)

    with TestClient(create_app(settings)) as client:  # installs BOOT from MSTAR_API_KEYS
        assert _status(client, lab_key) == _status(client, ops_key) == _status(client, BOOT) == 200

        listed = _mstar(env, "list")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["TENANT", "KEY", "ADMIN", "CREATED", "REVOKED"] and len(lines) == 4
        rows = {line.split()[0]: line.split() for line in lines[1:]}
        assert rows["lab"][1:3] == [lab_prefix, "no"] and rows["lab"][4] == "no"
        assert rows["ops"][2] == "yes" and re.fullmatch(r"h[0-9a-f]{15}", rows["boot"][1])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows["lab"][3])
        for secret in (lab_key, ops_key, BOOT, lab_key.split("_", 2)[2]):
            assert secret not in listed.stdout

        # by the prefix `list` shows (a minted key), and by the key itself (a configured one)
        by_prefix = _mstar(env, "revoke", lab_prefix)
        assert by_prefix.returncode == 0 and by_prefix.stdout == f"revoked key {lab_prefix} of tenant lab\n"
        by_key = _mstar(env, "revoke", BOOT)
        assert by_key.returncode == 0 and by_key.stdout == f"revoked key {rows['boot'][1]} of tenant boot\n"
        assert BOOT not in by_key.stdout
        again = _mstar(env, "revoke", f"mstar_{lab_prefix}")
        assert again.returncode == 0 and "already revoked" in again.stdout and len(again.stdout.splitlines()) == 1

        # unknown keys are refused in one line, and a key is never echoed back
        unknown = _mstar(env, "revoke", "0123456789ab")
        assert unknown.returncode == 2 and unknown.stdout == ""
        assert unknown.stderr.startswith("error [unknown_key]: no API key matches '0123456789ab'")
        forged = "mstar_" + ops_key.split("_")[1] + "_" + "x" * 43  # ops's public prefix, another secret
        wrong = _mstar(env, "revoke", forged)
        assert wrong.returncode == 2 and "unknown_key" in wrong.stderr and forged not in wrong.stderr
        assert len(wrong.stderr.splitlines()) == 1

        time.sleep(CACHE_S + 0.2)  # what the gateway checked within MSTAR_AUTH_CACHE_S is answered from memory
        assert _status(client, lab_key) == _status(client, BOOT) == 401
        assert _status(client, ops_key) == 200

    with TestClient(create_app(settings)) as client:  # a restart: MSTAR_API_KEYS still lists BOOT
        assert _status(client, lab_key) == _status(client, BOOT) == 401
        assert _status(client, ops_key) == 200

    listed = _mstar(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    revoked = {r["tenant"]: r["revoked"] for r in map(json.loads, listed.stdout.splitlines())}
    assert revoked == {"boot": True, "lab": True, "ops": False}
    only_ops = _mstar(env, "list", "--tenant", "ops", "--json")
    assert [json.loads(line)["admin"] for line in only_ops.stdout.splitlines()] == [True]


def test_a_key_revoked_in_sql_is_not_reinstalled_by_a_restart(tmp_path: Path, caplog) -> None:
    """The audit's reproduction: `UPDATE api_keys SET revoked = true` by hand, then a restart with the key still in
    `MSTAR_API_KEYS`: it stays refused (the start logs that it stays revoked) and `mstar keys list` says so."""
    from sqlalchemy import create_engine, text

    settings = Settings(
        data_dir=tmp_path / "data",
        pipeline="runner_pipelines:tiny",
        runner_workers=1,
        auth_cache_s=0,
        api_keys=[{"tenant": "boot", "key": BOOT}],
    )
    with TestClient(create_app(settings)) as client:
        assert _status(client, BOOT) == 200
    engine = create_engine(settings.db_url)
    with engine.begin() as conn:
        assert conn.execute(text("UPDATE api_keys SET revoked = true")).rowcount == 1
    engine.dispose()
    with caplog.at_level("WARNING", logger="mstar.store"), TestClient(create_app(settings)) as client:
        assert _status(client, BOOT) == 401
    assert any("is revoked and stays revoked" in r.getMessage() for r in caplog.records)
    assert all(BOOT not in r.getMessage() for r in caplog.records)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTAR_")}
    env.update(MSTAR_DATA_DIR=str(tmp_path / "data"))
    listed = _mstar(env, "list", "--json")
    assert [json.loads(line)["revoked"] for line in listed.stdout.splitlines()] == [True], listed.stderr
