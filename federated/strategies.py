"""Federated strategies for LightGBM: plain functions on model text and numpy.

A LightGBM model is a sum of trees, so models from several sites compose by
concatenating trees. The strategies here only ever touch model *text* (the
format `Booster.model_to_string()` writes and `Booster(model_str=...)` reads):
the server needs neither the sites' data nor LightGBM's training code.

Bagging (weighted tree averaging). In round r every site starts from the same
global model F and boosts `k` trees on its own rows, giving an update
Delta_s (the sum of its new trees). The server forms

    F' = F + sum_s w_s * Delta_s,     w_s = n_s / sum_j n_j

by multiplying the leaf values of site s's new trees by w_s and appending
them. Each site's update is a step along its own loss from the same point;
the pooled loss is the size-weighted sum of the sites' losses, so the
size-weighted average of the steps approximates the step pooled training
would take (FedAvg in function space). Plain concatenation without the
weights would take S steps at once and overshoot. A site that did not answer
in a round simply has no share that round (the weights are renormalized
over the sites that answered).

Cyclic. The model visits the sites in turn; each adds `k` trees at full
weight, boosting on the residual of everything before it.

Early stopping without pooling: a request can name checkpoints (tree
counts); every site returns the sum of its tuning rows' log-loss at each,
the server adds the sums and cuts the model where the pooled tuning loss is
lowest, as centralized early stopping would on the pooled tuning rows.

What travels: split thresholds, leaf values and leaf/internal counts of the
trees (counts are at least LightGBM's `min_data_in_leaf`); never rows. The
per-feature value ranges LightGBM stores in the header (`feature_infos`) are
replaced by `none` so that no site's minimum and maximum travel.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from chronorisk.errors import ChronoriskError

_TREE_HEADER = re.compile(r"^Tree=\d+$", re.MULTILINE)
_END_OF_TREES = "end of trees"
_SCALED_KEYS = ("leaf_value", "internal_value")


class ModelTextError(ChronoriskError):
    """A model string that is not LightGBM text format, or models that cannot be combined."""


@dataclass(frozen=True)
class TreeModel:
    """A LightGBM text model split into its header lines and its tree blocks.

    `trees[i]` is the body of tree i (the lines after `Tree=i`), without
    the trailing blank line; the header never contains `tree_sizes`.
    """

    header: tuple[str, ...]
    trees: tuple[str, ...]

    @property
    def num_trees(self) -> int:
        return len(self.trees)

    @property
    def feature_names(self) -> tuple[str, ...]:
        for line in self.header:
            if line.startswith("feature_names="):
                return tuple(line.split("=", 1)[1].split(" "))
        raise ModelTextError("model text has no feature_names line")

    def to_text(self) -> str:
        """LightGBM text format, loadable with `lightgbm.Booster(model_str=...)`."""
        parts = ["\n".join(self.header), ""]
        for i, body in enumerate(self.trees):
            parts.append(f"Tree={i}\n{body}\n")
        parts.append(f"{_END_OF_TREES}\n\npandas_categorical:null\n")
        return "\n".join(parts)


def parse_model(text: str) -> TreeModel:
    """Split LightGBM model text into header and trees (raises ModelTextError if it is not one)."""
    if not isinstance(text, str) or not text.startswith("tree\n"):
        raise ModelTextError("not a LightGBM text model (it must start with 'tree')")
    end = text.find(_END_OF_TREES)
    body = text if end < 0 else text[:end]
    starts = [m.start() for m in _TREE_HEADER.finditer(body)]
    head_text = body[: starts[0]] if starts else body
    header = tuple(
        _sanitize_header_line(line)
        for line in head_text.strip("\n").split("\n")
        if line and not line.startswith("tree_sizes=")
    )
    trees = []
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else len(body)
        block = body[start:stop].strip("\n")
        _, _, tree_body = block.partition("\n")
        if "is_linear=1" in tree_body:
            raise ModelTextError("linear trees are not supported by the federated strategies")
        trees.append(tree_body)
    model = TreeModel(header=header, trees=tuple(trees))
    if _header_value(model.header, "num_tree_per_iteration") not in (None, "1"):
        raise ModelTextError("only single-output (binary) models are supported")
    return model


def _sanitize_header_line(line: str) -> str:
    if line.startswith("feature_infos="):
        n = len(line.split("=", 1)[1].split(" "))
        return "feature_infos=" + " ".join(["none"] * n)
    return line


def _header_value(header: Sequence[str], key: str) -> str | None:
    for line in header:
        if line.startswith(key + "="):
            return line.split("=", 1)[1]
    return None


def scale_tree(body: str, factor: float) -> str:
    """Multiply a tree's leaf values (and internal values, used by SHAP) by `factor`."""
    if not np.isfinite(factor):
        raise ModelTextError(f"tree weight must be finite, got {factor!r}")
    out = []
    for line in body.split("\n"):
        key, sep, values = line.partition("=")
        if sep and key in _SCALED_KEYS and values:
            scaled = np.asarray(values.split(" "), dtype=np.float64) * factor
            line = f"{key}=" + " ".join(repr(float(v)) for v in scaled)
        out.append(line)
    return "\n".join(out)


def new_trees(model: TreeModel, start: int) -> TreeModel:
    """The trees from index `start` on (what a site added on top of a global model)."""
    if start > model.num_trees:
        raise ModelTextError(f"model has {model.num_trees} trees, cannot take trees from {start}")
    return TreeModel(header=model.header, trees=model.trees[start:])


def _check_compatible(models: Iterable[TreeModel]) -> None:
    names = {m.feature_names for m in models}
    if len(names) > 1:
        raise ModelTextError("models were trained on different feature lists (feature specs differ)")


def merge_bagging(global_model: TreeModel | None, updates: Sequence[tuple[TreeModel, float]]) -> TreeModel:
    """F + sum_s w_s * Delta_s with w_s = size_s / sum(size): weighted tree averaging.

    `updates` holds (new trees of site s, size of site s); sizes are
    normalized here, so a site missing from a round just has no share. The
    new trees are interleaved by boosting step (every site's 1st tree, then
    every site's 2nd, ...), so that the model cut after j steps of a round,
    `F + sum_s w_s * Delta_s[:j]`, is a prefix of the tree list: federated
    early stopping (`bagging_checkpoints`) can cut inside a round.
    """
    if not updates:
        raise ModelTextError("bagging needs at least one site update")
    sizes = np.asarray([size for _, size in updates], dtype=np.float64)
    if (sizes <= 0).any() or not np.isfinite(sizes).all():
        raise ModelTextError(f"site sizes must be positive and finite, got {sizes.tolist()}")
    weights = sizes / sizes.sum()
    base = [global_model] if global_model is not None else []
    _check_compatible([*base, *(m for m, _ in updates)])
    header = global_model.header if global_model is not None else updates[0][0].header
    trees = list(global_model.trees) if global_model is not None else []
    steps = max(update.num_trees for update, _ in updates)
    for j in range(steps):
        for (update, _), w in zip(updates, weights, strict=True):
            if j < update.num_trees:
                trees.append(scale_tree(update.trees[j], float(w)))
    return TreeModel(header=header, trees=tuple(trees))


def bagging_checkpoints(base_trees: int, site_trees: Sequence[int]) -> list[int]:
    """Tree counts of the models cut after 0, 1, ..., k boosting steps of a merged bagging round."""
    steps = max(site_trees, default=0)
    return [base_trees + sum(min(j, n) for n in site_trees) for j in range(steps + 1)]


def truncate(model: TreeModel, num_trees: int) -> TreeModel:
    """The first `num_trees` trees (a boosted model cut early is still a model)."""
    if not 0 < num_trees <= model.num_trees:
        raise ModelTextError(f"cannot keep {num_trees} of {model.num_trees} trees")
    return TreeModel(header=model.header, trees=model.trees[:num_trees])


def best_checkpoint(checkpoints: Sequence[int], loss_sums: np.ndarray, rows: float) -> tuple[int, float]:
    """(tree count, mean loss) of the checkpoint with the lowest pooled tuning loss (fewest trees on ties)."""
    if rows <= 0 or len(checkpoints) == 0:
        raise ModelTextError("no tuning rows to choose a checkpoint on")
    mean = np.asarray(loss_sums, dtype=np.float64) / rows
    best = int(np.argmin(mean))  # argmin takes the first (smallest model) of equal losses
    return int(checkpoints[best]), float(mean[best])


def append_cyclic(global_model: TreeModel | None, update: TreeModel) -> TreeModel:
    """F + Delta_s: the site's new trees at full weight (the model visited site s)."""
    if global_model is None:
        return update
    _check_compatible([global_model, update])
    return TreeModel(header=global_model.header, trees=global_model.trees + update.trees)


def site_weights(sizes: dict[str, int]) -> dict[str, float]:
    """Size shares of the sites (sum to 1)."""
    total = float(sum(sizes.values()))
    if total <= 0:
        raise ModelTextError("site sizes sum to zero")
    return {site: n / total for site, n in sizes.items()}


def cyclic_order(sites: Sequence[str], round_index: int) -> list[str]:
    """Visiting order for one pass: rotated by the round so no site is always first or last."""
    ordered = sorted(sites)
    if not ordered:
        return []
    shift = round_index % len(ordered)
    return ordered[shift:] + ordered[:shift]


def model_hash(text: str) -> str:
    """Short content hash of a model (names a global model in messages and logs)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
