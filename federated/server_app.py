"""Flower ServerApp: hands the Grid and the run config to the round loop (pipeline.py / runner.py).

Run config (set by `chronorisk federated run`): `work` (the work folder),
`params` (params.yaml), `tag` (names the result folder), and optional
overrides `strategy` and `rounds`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from chronorisk.federated.pipeline import run_on_grid

    run_on_grid(grid, dict(context.run_config))
