"""`flask pubsub ...`: the service's command line, over the same domain functions as the API."""

import click
import sqlalchemy as sa

from pubsub.commands import clients, maintenance, server


class OneLineUsageError(click.UsageError):
    """Bad arguments: one line on stderr and exit status 2, no usage block."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.text}", err=True)


class PubSubCommand(click.Command):
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            raise OneLineUsageError(error.format_message()) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            raise OneLineUsageError(error.format_message()) from None
        except sa.exc.SQLAlchemyError as error:
            first_line = (str(getattr(error, "orig", None) or error).splitlines() or [""])[0]
            raise click.ClickException(f"database error: {first_line}") from None


cli = click.Group("pubsub", help="Run and maintain the pubsub service.")
for command in (
    server.serve,
    maintenance.cleanup_acked,
    maintenance.cleanup_stuck,
    maintenance.cleanup_idempotency_keys,
    clients.generate_secret_key,
    clients.create_client,
):
    command.__class__ = PubSubCommand
    cli.add_command(command)
