"""`mstar keys create`: mint an API key for a tenant (stored hashed; the token is printed once)."""

from __future__ import annotations

import click

from service.cli import main


@main.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="tenant name (created when new)")
@click.option("--admin", is_flag=True, help="also grant the admin scope (model management)")
def create(tenant: str, admin: bool) -> None:
    """Print a new key for TENANT; keep it, it cannot be shown again."""
    from service.config import Settings
    from service.jobs.resources import close_stores, open_store
    from service.store import repo
    from service.store.db import transaction

    if not tenant.strip() or len(tenant) > 64:
        raise click.BadParameter("tenant must be 1-64 characters", param_hint="--tenant")
    with transaction(open_store(Settings()).sessions) as s:
        token = repo.create_api_key(s, tenant.strip(), admin=admin)
    close_stores()
    click.echo(token)
