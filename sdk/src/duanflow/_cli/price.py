"""``duanflow price set POOL PRICE`` and ``duanflow price list``: the live $/GPU-hour the router places by."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from duanflow_proto import subjects
from duanflow_proto.messages.common import HealthRequest
from duanflow_proto.messages.price import PriceList, PriceUpdate
from rich.table import Table

from duanflow._cli.output import CliError, errors_handled, out
from duanflow._client import get_client

app = typer.Typer(
    name="price",
    help='Live GPU prices: the next placement of `optimize="price"` functions uses them at once.',
    no_args_is_help=True,
    add_completion=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def _rows(prices: PriceList) -> list[dict[str, object]]:
    return [
        {"pool": p.pool, "gpu_type": p.gpu_type, "region": p.region, "price_per_gpu_hour": p.price_per_gpu_hour}
        for p in prices.prices
    ]


def _show(prices: PriceList, json_out: bool) -> None:
    if json_out:
        out.print_json(data={"prices": _rows(prices)})
        return
    if not prices.prices:
        out.print("No live prices set: agents' configured prices apply. Set one: duanflow price set POOL PRICE")
        return
    table = Table(title="live prices ($/GPU-hour)", title_justify="left")
    for col in ("pool", "gpu type", "price"):
        table.add_column(col)
    for p in prices.prices:
        table.add_row(p.pool, p.gpu_type or "any", f"{p.price_per_gpu_hour:.4f}")
    out.print(table)


@app.command(name="set")
def set_price(
    pool: Annotated[
        str,
        typer.Argument(metavar="POOL", help="`<region>-<gpu type>` in lower case (cn-shanghai-h100) or an agent id."),
    ],
    price: Annotated[float, typer.Argument(metavar="PRICE", help="Dollars per GPU-hour, e.g. 1.85.")],
    gpu_type: Annotated[str, typer.Option("--gpu", help="Only this GPU type of the pool.")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Set POOL's live price; the router uses it for the next placement and moves idle price-optimised replicas.

    ```
    duanflow price set cn-shanghai-h100 1.85
    ```
    """
    with errors_handled():
        if not math.isfinite(price) or price < 0:
            raise CliError(f"PRICE must be a finite number >= 0, got {price}")
        client = get_client()
        reply = client.run(
            client.request,
            subjects.API_PRICE_SET,
            PriceUpdate(pool=pool, price_per_gpu_hour=price, gpu_type=gpu_type),
            PriceList,
        )
        if not json_out:
            out.print(f"✓ {pool} now costs ${price:.4f}/GPU-hour")
        _show(reply, json_out)


@app.command(name="list")
def list_prices(json_out: JsonOpt = False) -> None:
    """Show the live price overrides.

    ```
    duanflow price list --json
    ```
    """
    with errors_handled():
        client = get_client()
        _show(client.run(client.request, subjects.API_PRICE_LIST, HealthRequest(), PriceList), json_out)
