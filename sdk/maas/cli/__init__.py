"""The `maas` command line: run the local stack, manage tenants and keys, upload, deploy, predict.

Each command group lives in its own module; this one only assembles them.
"""

from __future__ import annotations

import typer

from maas.cli import _shared
from maas.cli._shared import TlsCaOption
from maas.cli.admin import admin_app, whoami
from maas.cli.backup import backup, restore
from maas.cli.billing import billing_app
from maas.cli.datasets import datasets_app
from maas.cli.deploy import deploy_app, predict
from maas.cli.embed import embed, import_pretrained
from maas.cli.feedback import feedback
from maas.cli.generate import generate
from maas.cli.models import models_app
from maas.cli.nodes import nodes_app
from maas.cli.optimize import optimize
from maas.cli.stack import down, status, up
from maas.cli.train import jobs_app, train
from maas.cli.usage import usage

app = typer.Typer(
    help="Model-as-a-Service: register, deploy and call models on Triton.", no_args_is_help=True
)


@app.callback()
def options(tls_ca: TlsCaOption = None) -> None:
    """Options every command shares."""
    _shared.tls_ca = tls_ca


app.command()(up)
app.command()(down)
app.command()(status)
app.command()(whoami)
app.command()(predict)
app.command()(embed)
app.command()(generate)
app.command()(feedback)
app.command()(usage)
app.command()(train)
app.command()(optimize)
admin_app.command()(backup)
admin_app.command()(restore)
app.add_typer(admin_app, name="admin")
models_app.command("import-pretrained")(import_pretrained)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
app.add_typer(deploy_app, name="deploy")
app.add_typer(jobs_app, name="jobs")
app.add_typer(nodes_app, name="nodes")
app.add_typer(billing_app, name="billing")


def main() -> None:
    app()
