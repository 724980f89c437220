"""Key/value cache: what each attention layer has seen, so a decode step only computes the new token.

Only layers with their own keys/values have a cache; KV-shared layers read their source layer's.
A full-attention layer keeps every position. A sliding layer keeps a ring of its last `window`
positions, so its memory stays bounded however long the generation runs. Every stored key carries
its absolute position; attention masks are built from positions, which makes a cached step compute
exactly what a full recompute would.
"""

from __future__ import annotations

import numpy as np

from ferrisres.format import ModelConfig

SLACK = 16  # positions a sliding ring keeps beyond its window, so the last ones can be taken back


class FullLayerCache:
    """Every key/value so far, in a buffer that grows by doubling."""

    def __init__(self, kv_heads: int, head_dim: int):
        self.keys = np.empty((0, kv_heads, head_dim), dtype=np.float32)
        self.values = np.empty_like(self.keys)
        self.length = 0

    def update(self, keys: np.ndarray, values: np.ndarray, positions: np.ndarray):
        """Append the new tokens; returns (keys, values, key positions) to attend over."""
        n = self.length + len(keys)
        if n > len(self.keys):
            capacity = max(n, 2 * len(self.keys), 64)
            self.keys = _grown(self.keys, capacity, self.length)
            self.values = _grown(self.values, capacity, self.length)
        self.keys[self.length : n] = keys
        self.values[self.length : n] = values
        self.length = n
        first = int(positions[-1]) - n + 1
        return self.keys[:n], self.values[:n], np.arange(first, first + n)

    def snapshot(self):
        return self.length

    def restore(self, length) -> None:
        self.length = length

    truncate = restore


class SlidingLayerCache:
    """The last `window + SLACK` keys/values in a ring; slot p % size holds position p. The slack keeps
    the window's keys intact when the last few positions are taken back (`truncate`)."""

    def __init__(self, window: int, kv_heads: int, head_dim: int):
        self.size = window + SLACK  # the ring's full size; it starts small and grows with the tokens seen
        self.keys = np.zeros((min(self.size, 64), kv_heads, head_dim), dtype=np.float32)
        self.values = np.zeros_like(self.keys)
        self.positions = np.full(len(self.keys), -1, dtype=np.int64)  # -1: empty slot, never visible

    def _grow(self, needed: int) -> None:
        """Until the ring is full size no position has wrapped, so slot p % capacity stays p when it grows."""
        capacity = min(self.size, max(needed, 2 * len(self.keys)))
        extra = capacity - len(self.keys)
        # Empty slots must hold zeros, not np.empty's garbage: attention gives them weight 0, and 0 * NaN is NaN.
        self.keys = np.concatenate([self.keys, np.zeros((extra, *self.keys.shape[1:]), np.float32)])
        self.values = np.concatenate([self.values, np.zeros((extra, *self.values.shape[1:]), np.float32)])
        self.positions = np.concatenate([self.positions, np.full(extra, -1)])

    def update(self, keys: np.ndarray, values: np.ndarray, positions: np.ndarray):
        """Returns the ring's earlier tokens followed by the new ones, then stores the newest in the ring."""
        all_keys = np.concatenate([self.keys, keys])
        all_values = np.concatenate([self.values, values])
        all_positions = np.concatenate([self.positions, positions])
        if len(self.keys) < self.size and positions[-1] >= len(self.keys):
            self._grow(int(positions[-1]) + 1)
        keep = slice(max(0, len(keys) - len(self.keys)), len(keys))
        slots = positions[keep] % len(self.keys)
        self.keys[slots] = keys[keep]
        self.values[slots] = values[keep]
        self.positions[slots] = positions[keep]
        return all_keys, all_values, all_positions

    def snapshot(self):
        return self.keys.copy(), self.values.copy(), self.positions.copy()

    def restore(self, state) -> None:
        self.keys, self.values, self.positions = state

    def truncate(self, length: int) -> None:
        self.positions[self.positions >= length] = -1


class KVCache:
    """The caches of every layer that computes its own keys/values, and how many tokens they hold."""

    def __init__(self, config: ModelConfig):
        self.layers = {
            i: SlidingLayerCache(config.sliding_window, config.kv_heads[i], config.head_dims[i])
            if not config.is_full(i)
            else FullLayerCache(config.kv_heads[i], config.head_dims[i])
            for i in range(config.num_layers)
            if config.has_own_kv(i)
        }
        self.length = 0  # tokens seen: the position of the next token
        # Block AttnRes: sums over all positions so far of the scaled embeddings (row 0) and of each
        # block's layer outputs (row b + 1); a prefix mean is a sum divided by the count of positions.
        self.attnres_sums = np.zeros((len(config.attnres_blocks()) + 1, config.hidden_size)) if config.attnres else None

    def snapshot(self):
        """What `restore` needs to undo the next forward step (a few MB: the sliding rings are copied)."""
        sums = None if self.attnres_sums is None else self.attnres_sums.copy()
        return self.length, {i: layer.snapshot() for i, layer in self.layers.items()}, sums

    def restore(self, state) -> None:
        self.length, layers, self.attnres_sums = state
        for i, layer_state in layers.items():
            self.layers[i].restore(layer_state)

    def truncate(self, length: int) -> None:
        """Forget every position >= `length` (at most SLACK back: speculative decoding's rejected drafts)."""
        if self.attnres_sums is not None:
            raise ValueError("a cache with Block AttnRes sums cannot be truncated")
        if not self.length - SLACK <= length <= self.length:
            raise ValueError(f"can truncate {self.length} tokens to {self.length - SLACK}..{self.length}, not {length}")
        for layer in self.layers.values():
            layer.truncate(length)
        self.length = length


def _grown(a: np.ndarray, capacity: int, used: int) -> np.ndarray:
    bigger = np.empty((capacity, *a.shape[1:]), dtype=a.dtype)
    bigger[:used] = a[:used]
    return bigger
