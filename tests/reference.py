"""Reference helpers for the loader tests: the jaxkv layout rebuilt independently from a HF state dict.

A plain module (not conftest) so test files can import it; pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxkv.load.hf import LAYER_KEYS, TOP_KEYS


def expected_params(state: dict[str, np.ndarray], cfg) -> dict:
    """The jaxkv layout built independently from the torch state dict: transpose, stack."""
    layers = {}
    for suffix, (name, transpose) in LAYER_KEYS.items():
        per_layer = [state.get(f"model.layers.{i}.{suffix}") for i in range(cfg.num_layers)]
        if per_layer[0] is not None:
            layers[name] = np.stack([w.T if transpose else w for w in per_layer])
    out = {"layers": layers}
    for hf_name, (name, transpose) in TOP_KEYS.items():
        if name == "lm_head" and cfg.tie_word_embeddings:
            continue
        out[name] = state[hf_name].T if transpose else state[hf_name]
    return out


def assert_tree_equal(params, want):
    flat_p = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_w = dict(jax.tree_util.tree_leaves_with_path(want))
    assert set(map(jax.tree_util.keystr, flat_p)) == set(map(jax.tree_util.keystr, flat_w))
    for path, w in flat_w.items():
        np.testing.assert_array_equal(np.asarray(flat_p[path]), w, err_msg=jax.tree_util.keystr(path))
