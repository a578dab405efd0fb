"""`sfumato serve`: the click command that builds a ServerConfig and runs uvicorn."""

from __future__ import annotations

from pathlib import Path

import click

from sfumato.commands import user_errors
from sfumato.errors import SfumatoError
from sfumato.server.auth import ApiKey, AuthConfig, check_bind, load_keys_file, parse_api_auth


def caps_options(command):
    """One --max-* flag per field of Caps, with the dataclass default."""
    from dataclasses import fields

    from sfumato.server.app import Caps

    for f in reversed(fields(Caps)):
        flag = "--" + f.name.replace("_", "-")
        command = click.option(flag, f.name, type=click.IntRange(min=1), default=f.default,
                               show_default=True, help=f"Cap: {f.name.replace('_', ' ')}.")(command)
    return command


def folder(exists: bool = True) -> click.Path:
    return click.Path(path_type=Path, file_okay=False, exists=exists)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs credentials.")
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--model", help="Model to serve by default: a file or folder (default: built-in).")
@click.option("--models-dir", type=folder(), help="Folder of models the API may switch to.")
@click.option("--vae-dir", type=folder(), help="Folder of VAEs (default: --models-dir).")
@click.option("--lora-dir", type=folder(), help="Folder of LoRAs for <lora:name:w> and pickers.")
@click.option("--outputs", type=folder(False), default=Path("outputs"), show_default=True,
              help="Images and the job database go here.")
@click.option("--api-key", "api_keys", multiple=True, help="Accept `Authorization: Bearer KEY`.")
@click.option("--keys-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="JSON or TOML list of keys with optional monthly image quotas.")
@click.option("--api-auth", help="A1111-style HTTP Basic credentials: user:pass[,user:pass].")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser pages from this origin (default: no CORS).")
@click.option("--lever", "levers", multiple=True,
              help="Speed lever for every model it loads, repeatable: compile (exact; the first image "
                   "of each size waits a minute or two for compiling, later ones are ~1.7x faster on a "
                   "CPU), deepcache, tome (tome=RATIO; a request may ask another with A1111's "
                   "token_merging_ratio), int8, bf16 (lossy); no-NAME turns a default one off.")
@caps_options
@user_errors
def serve(host: str, port: int, model: str | None, models_dir: Path | None, vae_dir: Path | None,
          lora_dir: Path | None, outputs: Path, api_keys: tuple[str, ...], keys_file: Path | None,
          api_auth: str | None, cors_origins: tuple[str, ...], levers: tuple[str, ...], **caps: int) -> None:
    """Serve the A1111-compatible API, the jobs API and the web page."""
    import functools

    import uvicorn

    from sfumato.accel import Levers
    from sfumato.server.app import Caps, ServerConfig, create_app
    from sfumato.server.worker import load_pipeline

    Levers.parse(levers)  # a misspelt lever is an error now, not when the first job loads the model

    keys = tuple(ApiKey(f"key{i}", k) for i, k in enumerate(api_keys))
    keys += load_keys_file(keys_file) if keys_file else ()
    auth = AuthConfig(keys=keys, basic=parse_api_auth(api_auth))
    check_bind(host, auth)
    config = ServerConfig(outputs=outputs, model=resolve_model(model, models_dir),
                          models_dir=models_dir, vae_dir=vae_dir, lora_dir=lora_dir, auth=auth,
                          cors_origins=cors_origins, caps=Caps(**caps),
                          engine_factory=functools.partial(load_pipeline, levers=levers))
    click.echo(f"sfumato: serving on http://{host}:{port}/  (API docs: /docs)", err=True)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")


def resolve_model(model: str | None, models_dir: Path | None) -> Path | None:
    """--model: a name inside --models-dir, or a path (the command line is trusted)."""
    if model is None:
        return None
    if models_dir is not None and (models_dir / model).exists():
        return models_dir / model
    if not Path(model).exists():
        raise SfumatoError(f"--model {model}: no such file or folder")
    return Path(model)
