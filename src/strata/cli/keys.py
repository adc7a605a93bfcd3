"""`strata keys create`: a release key pair for signing packages (keep the private key offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from strata.cli.common import console, out

app = typer.Typer(help="Release keys that sign packages.", no_args_is_help=True)


@app.command("create")
def create(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for NAME.key (private, mode 0600) and NAME.pub.")],
    name: Annotated[str, typer.Option("--name", help="File name of the pair.")] = "release",
) -> None:
    """Make an EC P-256 release key pair. Give NAME.pub to `strata server --release-key`; keep NAME.key offline
    and sign with it (`strata model sign`, `strata model push --sign-key`)."""
    from strata.trust.signing import create_release_key, key_hint

    private_path, public_path = create_release_key(out_dir, name)
    console.print(f"release key {key_hint(public_path.read_bytes())[:16]}: keep {private_path} offline")
    out.print(str(public_path))
