"""XGBoost's deprecated binary model layout, read into the JSON model the current XGBoost loads.

Owns: parsing the binary layout that ``XGBoosterSaveModel`` wrote for a file name
not ending in ``.json``/``.ubj`` up to XGBoost 2.0 (what PostgresML's Rust runtime
stored: ``Booster::save("/tmp/pgml_<n>.bin")``), for ``gbtree`` and ``dart``
boosters, and writing the same model as XGBoost's JSON document. XGBoost 3 no
longer reads the binary layout, so this module is the only reader of it here.

The layout (XGBoost ``src/learner.cc``, ``src/gbm/gbtree_model.cc``,
``src/tree/tree_model.cc``): an optional ``binf`` magic, ``LearnerModelParamLegacy``
(136 bytes), the objective and booster names (u64 length + bytes), the booster
(``GBTreeModelParam``, 160 bytes; per tree ``TreeParam``, 148 bytes, then 20-byte
nodes and 16-byte node statistics; then one i32 tree group per tree; ``dart``: the
tree weights), then the learner's attributes when ``contain_extra_attrs`` is set (since
XGBoost 1.0 the objective's JSON configuration among them), ``count:poisson``'s
``max_delta_step`` and the evaluation metrics' names when flagged. All little-endian.

Must not: load or run the model (the caller hands the JSON to XGBoost's own loader),
or accept trailing or missing bytes silently: any inconsistency is a ValueError.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAGIC = b"binf"
_LEARNER = struct.Struct("<fIiiiIIIi100x")  # base_score … boost_from_average, 25 reserved ints
_GBTREE = struct.Struct("<iiiiqii128x")  # num_trees, num_parallel_tree, num_feature, pad, pbuffer, groups, leaf vec
_TREE = struct.Struct("<iiiiii124x")  # num_roots, num_nodes, num_deleted, max_depth, num_feature, size_leaf_vector
_NODE = struct.Struct("<iiiIf")  # parent (bit 31: left child), left, right, split index (bit 31: default left), value
_STAT = struct.Struct("<fffi")  # loss_chg, sum_hess, base_weight, leaf_child_cnt
_TREE_BOOSTERS = ("gbtree", "dart")
# Objective names the old layout may hold that XGBoost 3 knows under another name.
_RENAMED = {"reg:linear": "reg:squarederror", "gpu:reg:linear": "reg:squarederror"}


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise ValueError("truncated XGBoost binary model")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def string(self) -> str:
        (size,) = struct.unpack("<Q", self.take(8))
        return self.take(int(size)).decode()


def is_legacy(data: bytes) -> bool:
    """Whether ``data`` looks like the binary layout (rather than JSON or UBJSON, which start with ``{``)."""
    return data.startswith(MAGIC) or (len(data) > _LEARNER.size and not data.startswith(b"{"))


def to_json(data: bytes) -> bytes:
    """The model in ``data`` (binary layout) as XGBoost's JSON model document; ValueError if it is not one."""
    reader = _Reader(data[len(MAGIC) :] if data.startswith(MAGIC) else data)
    base_score, num_feature, num_class, extra_attrs, evaluation, _major, _minor, num_target, from_average = (
        reader.unpack(_LEARNER)
    )
    objective, booster = reader.string(), reader.string()
    if booster not in _TREE_BOOSTERS:
        raise ValueError(f"XGBoost booster {booster!r} is not supported (gbtree and dart are)")
    model = _gbtree(reader)
    if booster == "dart":
        (count,) = struct.unpack("<Q", reader.take(8))
        weights = list(struct.unpack(f"<{count}f", reader.take(4 * int(count))))
    attributes = dict(_pairs(reader)) if extra_attrs else {}
    if objective == "count:poisson" and reader.offset < len(reader.data):
        reader.string()  # max_delta_step, also in the objective's configuration
    if evaluation:
        _strings(reader)  # the evaluation metrics' names: training only
    if reader.offset != len(reader.data):
        raise ValueError("trailing bytes after the XGBoost binary model")
    # XGBoost 1.0 and later keep the objective's configuration, parameters included, as an attribute.
    configured = json.loads(attributes.pop("objective")) if "objective" in attributes else None
    name = _RENAMED.get(objective, objective)
    gradient_booster: dict[str, Any] = {"name": "gbtree", "model": model}
    if booster == "dart":
        gradient_booster = {"name": "dart", "gbtree": gradient_booster, "weight_drop": weights}
    learner: dict[str, Any] = {
        "attributes": attributes,
        "feature_names": [],
        "feature_types": [],
        "gradient_booster": gradient_booster,
        "learner_model_param": {
            "base_score": repr(float(base_score)),
            "boost_from_average": str(int(from_average)),
            "num_class": str(int(num_class)),
            "num_feature": str(int(num_feature)),
            "num_target": str(max(1, int(num_target))),
        },
        "objective": configured or _objective(name, int(num_class)),
    }
    return json.dumps({"learner": learner, "version": [2, 0, 0]}).encode()


def _pairs(reader: _Reader) -> list[tuple[str, str]]:
    (count,) = struct.unpack("<Q", reader.take(8))
    return [(reader.string(), reader.string()) for _ in range(int(count))]


def _strings(reader: _Reader) -> list[str]:
    (count,) = struct.unpack("<Q", reader.take(8))
    return [reader.string() for _ in range(int(count))]


def _gbtree(reader: _Reader) -> dict[str, Any]:
    num_trees, parallel, _features, _pad, _pbuffer, num_groups, _leaf = reader.unpack(_GBTREE)
    if num_trees < 0:
        raise ValueError("damaged XGBoost binary model")
    trees = [_tree(reader, i) for i in range(num_trees)]
    groups = list(struct.unpack(f"<{num_trees}i", reader.take(4 * num_trees)))
    per_iteration = max(1, parallel) * max(1, num_groups)
    indptr = list(range(0, num_trees + 1, per_iteration)) if num_trees % per_iteration == 0 else [0, num_trees]
    model = {
        "gbtree_model_param": {"num_parallel_tree": str(max(1, parallel)), "num_trees": str(num_trees)},
        "iteration_indptr": indptr,
        "tree_info": groups,
        "trees": trees,
    }
    return model


def _tree(reader: _Reader, index: int) -> dict[str, Any]:
    _roots, num_nodes, num_deleted, _depth, num_feature, _leaf = reader.unpack(_TREE)
    if num_nodes <= 0:
        raise ValueError("damaged XGBoost binary model: a tree without nodes")
    nodes = [reader.unpack(_NODE) for _ in range(num_nodes)]
    stats = [reader.unpack(_STAT) for _ in range(num_nodes)]
    mask = (1 << 31) - 1
    return {
        "base_weights": [s[2] for s in stats],
        "categories": [],
        "categories_nodes": [],
        "categories_segments": [],
        "categories_sizes": [],
        "default_left": [int(n[3] >> 31) for n in nodes],
        "id": index,
        "left_children": [n[1] for n in nodes],
        "loss_changes": [s[0] for s in stats],
        "parents": [n[0] & mask for n in nodes],
        "right_children": [n[2] for n in nodes],
        "split_conditions": [n[4] for n in nodes],
        "split_indices": [n[3] & mask for n in nodes],
        "split_type": [0] * num_nodes,
        "sum_hessian": [s[1] for s in stats],
        "tree_param": {
            "num_deleted": str(num_deleted),
            "num_feature": str(num_feature),
            "num_nodes": str(num_nodes),
            "size_leaf_vector": "1",
        },
    }


def _objective(name: str, num_class: int) -> dict[str, Any]:
    """The objective with the parameters XGBoost's JSON expects (their defaults: the binary layout kept none)."""
    if name.startswith("multi:"):
        return {"name": name, "softmax_multiclass_param": {"num_class": str(num_class)}}
    if name == "count:poisson":
        return {"name": name, "poisson_regression_param": {"max_delta_step": "0.7"}}
    if name == "reg:tweedie":
        return {"name": name, "tweedie_regression_param": {"tweedie_variance_power": "1.5"}}
    if name == "reg:pseudohubererror":
        return {"name": name, "pseudo_huber_param": {"huber_slope": "1"}}
    return {"name": name, "reg_loss_param": {"scale_pos_weight": "1"}}
