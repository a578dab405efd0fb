"""The command line: a thin client of the Python API.

Sub-commands live beside the code they drive and are imported only when invoked, so that
`sfumato generate` does not pay for importing the server or the trainers.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command; resolved on first use.
COMMANDS = {
    "generate": "sfumato.commands:generate",
    "info": "sfumato.commands:info",
    "export": "sfumato.commands:export",
    "train": "sfumato.train.cli:train",
    "serve": "sfumato.server.cli:serve",
    "bench": "sfumato.bench:bench",
    "world": "sfumato.world.cli:world",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported only when used."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy=COMMANDS)
@click.version_option(package_name="sfumato")
def cli() -> None:
    """sfumato: local, offline text-to-image."""


def main() -> None:
    # Only the real command line may end its process early (commands.quick_exit); a CliRunner in
    # the tests, or any other caller of `cli`, gets no such object.
    cli(obj={"quick_exit": True})


if __name__ == "__main__":  # python -m sfumato.cli
    main()
