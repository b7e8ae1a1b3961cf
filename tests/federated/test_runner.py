"""The round loop over synthetic non-IID sites: accuracy against pooled training, faults, strategies."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest
from fed_helpers import LGB, contexts, fed_config, table_handler, trainer_kwargs

from chronorisk.federated.calibration import BinnedScores, binned_auroc
from chronorisk.federated.runner import FederatedError, FederatedTrainer
from chronorisk.federated.simulation import LocalTransport
from chronorisk.federated.site import auroc


def _pooled(sites, split):
    X = np.vstack([t.X[t.split == split] for t in sites.values()])
    y = np.concatenate([t.y[t.split == split] for t in sites.values()])
    return X, y


def _run(sites, tmp_path, drop=None, **cfg):
    cfg.setdefault("early_stopping", False)
    lgb_overrides = cfg.pop("lgb", None)
    transport = LocalTransport(contexts(sites, tmp_path), drop=drop, handler=table_handler(sites))
    trainer = FederatedTrainer(transport, fed_config(**cfg), **trainer_kwargs(lgb_overrides))
    return trainer.run(), transport


@pytest.fixture(scope="module")
def bagging(sites, tmp_path_factory):
    result, _ = _run(sites, tmp_path_factory.mktemp("bagging"), strategy="bagging")
    return result


def test_bagging_matches_pooled_training_and_helps_the_small_site(sites, bagging):
    result = bagging
    fed = lgb.Booster(model_str=result.tasks["t"].model_text)
    X_tr, y_tr = _pooled(sites, "train")
    central = lgb.train(LGB, lgb.Dataset(X_tr, y_tr), num_boost_round=100)
    X_ho, y_ho = _pooled(sites, "held_out")
    auc_fed = auroc(y_ho, fed.predict(X_ho, raw_score=True))
    auc_central = auroc(y_ho, central.predict(X_ho, raw_score=True))
    assert auc_fed > auc_central - 0.01
    small = sites["small"]
    local = lgb.train(LGB, lgb.Dataset(small.X[small.split == "train"], small.y[small.split == "train"]),
                      num_boost_round=100)
    ho = small.split == "held_out"
    assert auroc(small.y[ho], fed.predict(small.X[ho], raw_score=True)) > auroc(
        small.y[ho], local.predict(small.X[ho], raw_score=True)
    )
    # the per-site table from binned statistics agrees with exact AUROC on the rows (cells pooled to >= 5 rows
    # before they leave the site tie a few more pairs: a few thousandths on this small site's held-out rows)
    site_auc = result.tasks["t"].site_metrics["small"]["auroc"]
    assert site_auc == pytest.approx(auroc(small.y[ho], fed.predict(small.X[ho], raw_score=True)), abs=0.006)
    assert result.tasks["t"].num_trees == 4 * 25 * 4  # rounds x trees x sites
    assert set(result.tasks["t"].site_sizes) == set(sites)


def test_calibrated_federated_model_is_calibrated(bagging):
    overall = bagging.tasks["t"].overall
    assert 0.85 < overall["calibration_slope"] < 1.15
    assert overall["ece"] < 0.03
    assert bagging.tasks["t"].calibration_info["method"] in ("platt", "isotonic")


def test_round_logs_split_local_work_from_overhead(bagging):
    for entry in bagging.rounds:
        assert entry.wall_s >= 0 and entry.overhead_s >= 0 and entry.bytes_out > 0 and entry.bytes_in > 0
    assert [r.phase for r in bagging.rounds] == ["summary", "train", "train", "train", "train", "evaluate"]


def test_cyclic_visits_every_site_in_turn(sites, tmp_path):
    result, _ = _run(sites, tmp_path, strategy="cyclic", rounds=2, cyclic_trees=15)
    train_rounds = [r for r in result.rounds if r.phase == "train"]
    assert len(train_rounds) == 2 * len(sites)
    assert all(len(r.sites) == 1 for r in train_rounds)
    assert [r.sites[0] for r in train_rounds[:4]] == sorted(sites)  # pass 1 in order
    assert [r.sites[0] for r in train_rounds[4:]] == sorted(sites)[1:] + sorted(sites)[:1]  # rotated
    assert result.tasks["t"].num_trees == 2 * 15 * len(sites)
    assert result.tasks["t"].overall["auroc"] > 0.7


def test_round_goes_on_without_a_dead_site_and_it_rejoins(sites, tmp_path):
    dead = {("mid", "train", 2)}
    result, _ = _run(sites, tmp_path, drop=lambda s, p, r: (s, p, r) in dead, rounds=3, trees_per_round=10)
    train_rounds = {r.round: r for r in result.rounds if r.phase == "train"}
    assert "mid" in train_rounds[2].missing and "mid" not in train_rounds[2].sites
    assert "mid" in train_rounds[3].sites  # back after restart
    assert any("mid left out" in e for e in result.events)
    assert result.tasks["t"].num_trees == 10 * (4 + 3 + 4)


def test_too_few_sites_stop_the_run_naming_the_missing(sites, tmp_path):
    gone = {"mid", "east"}
    with pytest.raises(FederatedError, match=r"2 site\(s\) answered, at least 3 needed.*east.*mid"):
        _run(sites, tmp_path, drop=lambda s, p, r: s in gone and p == "train")


def test_offline_site_is_skipped_in_cyclic(sites, tmp_path):
    transport = LocalTransport(contexts(sites, tmp_path), handler=table_handler(sites))
    trainer = FederatedTrainer(transport, fed_config(strategy="cyclic", rounds=1, cyclic_trees=5,
                                                     early_stopping=False),
                               **trainer_kwargs())
    trainer.summaries()
    transport.offline.add("east")
    trainer.run  # noqa: B018 - the bound method exists; run the phases by hand below
    from chronorisk.federated.runner import _TaskState

    states = {"t": _TaskState(spec_json="{}", spec_hash="x", times=["2020-01-01T00:00:00"])}
    trainer.train_cyclic(states)
    assert any("east is not connected" in e for e in trainer.events)
    assert states["t"].model.num_trees == 5 * 3


def test_early_stopping_cuts_where_the_pooled_tuning_loss_is_lowest(sites, tmp_path):
    result, _ = _run(sites, tmp_path, early_stopping=True, rounds=6, trees_per_round=30,
                     lgb={"learning_rate": 0.5})
    task = result.tasks["t"]
    curve = np.array(task.loss_curve)
    assert task.early_stopping["trees"] == task.num_trees < 6 * 30 * len(sites)
    best = curve[np.argmin(curve[:, 1])]
    assert task.num_trees == int(best[0])
    # the pooled loss from the sites' sums equals the loss on the pooled tuning rows
    X_tu, y_tu = _pooled(sites, "tuning")
    raw = lgb.Booster(model_str=task.model_text).predict(X_tu, raw_score=True)
    assert np.mean(np.logaddexp(0, raw) - y_tu * raw) == pytest.approx(best[1], rel=1e-6)


def test_cyclic_is_cut_at_the_pooled_best_after_a_pass(sites, tmp_path):
    result, _ = _run(sites, tmp_path, strategy="cyclic", early_stopping=True, rounds=3, cyclic_trees=40,
                     lgb={"learning_rate": 0.5})
    task = result.tasks["t"]
    assert task.early_stopping["at"].startswith("pass ")
    assert task.num_trees < 3 * 40 * len(sites)
    checks = [r for r in result.rounds if r.phase == "evaluate" and r.round > 100]
    assert checks and all(len(r.sites) == len(sites) for r in checks)  # every site scores the pass


def test_binned_auroc_of_site_tables_equals_pooled(sites):
    rng = np.random.default_rng(0)
    scores = {s: rng.normal(t.y * 1.0, 1.0) for s, t in sites.items()}
    pooled = BinnedScores()
    for s, t in sites.items():
        pooled = pooled + BinnedScores.from_rows(scores[s], t.y)
    all_y = np.concatenate([t.y for t in sites.values()])
    all_s = np.concatenate(list(scores.values()))
    assert binned_auroc(pooled) == pytest.approx(auroc(all_y, all_s), abs=0.002)
