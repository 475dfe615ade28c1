"""`mstar keys create|list|revoke`: API keys of tenants (stored hashed; a new key's token is printed once).

Keys are named by their public prefix: the 12 hex digits after `mstar_` in a minted key (`mstar_<prefix>_<secret>`),
or `h` and 15 hex digits for a key given in `MSTAR_API_KEYS`. `list` shows prefixes, never a secret (only digests
are stored). A revoked key stays revoked: `mstar serve` never re-enables it from `MSTAR_API_KEYS`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy.orm import Session

from service.cli import main


@contextmanager
def _session() -> Iterator[Session]:
    """One transaction on the job database the settings (MSTAR_* variables, .env) name."""
    from service.config import Settings
    from service.jobs.resources import close_stores, open_store
    from service.store.db import transaction

    try:
        with transaction(open_store(Settings()).sessions) as s:
            yield s
    finally:
        close_stores()


@main.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="tenant name (created when new)")
@click.option(
    "--admin",
    is_flag=True,
    help="also grant the admin scope: deployment-wide (model reloads, PACS servers, every tenant's audit log)",
)
def create(tenant: str, admin: bool) -> None:
    """Print a new key for TENANT; keep it, it cannot be shown again."""
    from service.store import repo

    if not tenant.strip() or len(tenant) > 64:
        raise click.BadParameter("tenant must be 1-64 characters", param_hint="--tenant")
    with _session() as s:
        token = repo.create_api_key(s, tenant.strip(), admin=admin)
    click.echo(token)


@keys.command("list")
@click.option("--tenant", default=None, help="only this tenant's keys")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per key instead of a table")
def list_keys(tenant: str | None, as_json: bool) -> None:
    """List keys: tenant, key prefix, admin, created (UTC), revoked. Secrets are never shown (not even stored)."""
    from service.store import repo

    with _session() as s:
        rows = [
            {
                "tenant": name,
                "key": key.prefix,
                "admin": bool(key.admin),
                "created": repo.key_created_at(key).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "revoked": bool(key.revoked),
            }
            for key, name in repo.list_api_keys(s, tenant.strip() if tenant else None)
        ]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    table = [("TENANT", "KEY", "ADMIN", "CREATED", "REVOKED")] + [
        (r["tenant"], r["key"], "yes" if r["admin"] else "no", r["created"], "yes" if r["revoked"] else "no")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


@keys.command("revoke")
@click.argument("key")
def revoke(key: str) -> None:
    """Revoke KEY: its prefix as `mstar keys list` shows it (or `mstar_<prefix>`), or the whole key.

    Running gateways refuse it at their next check (within MSTAR_AUTH_CACHE_S), and a restart never re-enables
    it, even while it is still listed in MSTAR_API_KEYS. A revoked key cannot be re-enabled: create a new one."""
    from service.store import repo

    with _session() as s:
        row, tenant, already = repo.revoke_api_key(s, key)
    if already:
        click.echo(f"key {row.prefix} of tenant {tenant} was already revoked")
    else:
        click.echo(f"revoked key {row.prefix} of tenant {tenant}")
