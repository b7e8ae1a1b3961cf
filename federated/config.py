"""Typed configuration of federated training, parsed from params.yaml (`federated:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FederatedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["bagging", "cyclic"] = Field(
        "bagging", description="bagging: all sites boost from the same global model each round, trees "
        "averaged by site size; cyclic: the model visits the sites in turn"
    )
    rounds: int = Field(6, ge=1, description="bagging rounds, or cyclic passes over all sites")
    trees_per_round: int = Field(30, ge=1, description="trees each site adds per round (per visit, cyclic)")
    cyclic_trees: int = Field(
        5, ge=1, description="cyclic: trees each site adds per visit (small steps: the model moves on quickly)"
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="LightGBM learning rate at the sites (null = model.lightgbm's)"
    )
    early_stopping: bool = Field(
        True, description="cut the model where the pooled tuning log-loss (sums from the sites) is lowest"
    )
    min_sites: int = Field(3, ge=1, description="a round goes on when at least this many sites answered")
    round_timeout_s: float = Field(120.0, gt=0, description="deadline of every exchange")
    straggler_wait_s: float = Field(
        20.0, ge=0, description="once min_sites answered, the others get as long again as that took, "
        "and at least this long"
    )
    connect_timeout_s: float = Field(120.0, gt=0, description="wait this long for min_sites SuperNodes")
    poll_interval_s: float = Field(0.2, gt=0, le=5, description="ServerApp's pull_messages interval")
    summary_min_count: int = Field(
        3, ge=1, description="sites withhold code counts and sketches of codes seen in fewer subjects"
    )
    min_cell_rows: int = Field(
        5, ge=1, description="sites pool binned calibration/evaluation cells of fewer rows with their neighbours, "
        "so that no cell reveals a few patients' outcomes"
    )
    site_recalibration: bool = Field(
        False, description="store each site's recalibration (from its tuning bins, shrunk towards the global "
        "calibration) with the federated model: its scores at that site use it"
    )
    seed: int = Field(0, description="seed of LightGBM's bagging at the sites (plus round and site)")
    site_threads: int = Field(1, ge=1, description="LightGBM threads per site (SuperNodes share the machine)")
    mlflow: bool = Field(True, description="log per-round metrics per site and the result to MLflow")
    register_model: bool = Field(True, description="register the federated models as chronorisk-<task> versions")
    superlink_port: int = Field(9092, ge=0, le=65535, description="SuperLink HTTPS port (0 = any free port)")
    task_poll_interval_s: float = Field(
        0.2, ge=0.01, le=60, description="FLWR_SUPEREXEC_TASK_POLL_INTERVAL of the SuperLink and SuperNodes "
        "(every SuperExec asks its SuperNode this often: 0.05 s kept 0.4 cores busy while idle, 0.2 s 0.15)"
    )
    up_timeout_s: float = Field(180.0, gt=0, description="`federated up` waits this long for every SuperNode")
