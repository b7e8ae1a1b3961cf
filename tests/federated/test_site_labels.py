"""A site's supplied labels come from its own node config; the SuperNode command carries them."""

from __future__ import annotations

from pathlib import Path

from chronorisk.federated import deploy
from chronorisk.federated.site import SiteContext


def test_node_config_names_the_sites_own_labels(tmp_path):
    config = {"site": "north", "meds": str(tmp_path / "m"), "cache": str(tmp_path / "c"),
              "labels": str(tmp_path / "north_labels")}
    ctx = SiteContext.from_node_config(config)
    assert ctx.labels == Path(tmp_path / "north_labels")
    assert SiteContext.from_node_config({k: v for k, v in config.items() if k != "labels"}).labels is None
    layout = deploy.Layout(tmp_path)
    cmd = deploy.supernode_command(layout, "north", superlink_port=9092, runtime_port=9100,
                                   meds_root=tmp_path / "m", labels=tmp_path / "north_labels")
    node_config = cmd[cmd.index("--node-config") + 1]
    assert f'labels="{tmp_path / "north_labels"}"' in node_config and 'site="north"' in node_config
    plain = deploy.supernode_command(layout, "north", superlink_port=9092, runtime_port=9100, meds_root=tmp_path)
    assert "labels=" not in plain[plain.index("--node-config") + 1]
