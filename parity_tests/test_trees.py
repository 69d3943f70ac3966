"""`convert.base.trees` (the base's flatten/unflatten, without Flax) against Flax's own `traverse_util`."""

from __future__ import annotations

import numpy as np
import pytest
from flax import traverse_util
from flax.core import freeze

from convert.base.trees import flatten, unflatten


def test_flatten_and_unflatten_agree_with_flax():
    leaf = np.arange(3)
    tree = {"encoder": {"layers": {"0": {"k": {"kernel": leaf, "bias": 1.5}}, "1": {"k": {"kernel": leaf}}},
                        "empty": {}},
            "lm_head": {"kernel": leaf}}
    ours = flatten(tree)
    theirs = traverse_util.flatten_dict(tree, sep="/")
    assert list(ours) == list(theirs) and all(ours[k] is theirs[k] for k in theirs)
    assert flatten(freeze(tree)).keys() == theirs.keys()
    back, flax_back = unflatten(ours), traverse_util.unflatten_dict(theirs, sep="/")
    assert traverse_util.flatten_dict(back, sep="/").keys() == traverse_util.flatten_dict(flax_back, sep="/").keys()
    assert back["encoder"]["layers"]["0"]["k"]["kernel"] is leaf and back["encoder"]["layers"]["0"]["k"]["bias"] == 1.5


def test_a_path_that_is_a_leaf_and_a_subtree_is_refused():
    with pytest.raises(ValueError, match="a/b"):
        unflatten({"a": 1, "a/b": 2})
    with pytest.raises(ValueError, match="a"):
        unflatten({"a/b": 2, "a": 1})


def test_two_leaves_that_join_to_one_path_are_refused():
    from convert.base.trees import PathClash

    with pytest.raises(PathClash, match="a/b"):
        flatten({"a/b": 1, "a": {"b": 2}})
