"""Auth bootstrap: a signing key, and the first (admin) client."""

import secrets

import click
from flask.cli import with_appcontext

from pubsub import clients, db
from pubsub.errors import InvalidInput


@click.command("generate-secret-key")
def generate_secret_key() -> None:
    """Print a new random AUTH_SECRET_KEY (256 bits, hex)."""
    click.echo(f"new_secret={secrets.token_hex(32)}")


@click.command("create-client")
@click.argument("name")
@click.argument("scopes")
@click.option("--inactive", is_flag=True, help="Create it deactivated.")
@with_appcontext
def create_client(name: str, scopes: str, inactive: bool) -> None:
    """Create an API client with space-separated SCOPES ('*' for admin); prints its credentials."""
    if not 1 <= len(name) <= 255:
        raise click.BadParameter("must be 1 to 255 characters", param_hint="NAME")
    try:
        scopes = clients.normalize_scopes(scopes)
    except InvalidInput as error:
        raise click.BadParameter(error.detail.removeprefix("scopes: "), param_hint="SCOPES") from None
    with db.begin() as conn:
        client_id, secret = clients.create_client(conn, name, scopes, is_active=not inactive)
    click.echo(f"client_id={client_id}")
    click.echo(f"client_secret={secret}")
