"""CLS-row attention probe: the CLS token's attention at chosen layers, and nothing more.

Forward hooks on a layer's q/k projections capture the CLS query and all keys and
compute `softmax(q_cls . K^T * scale)` in fp32, summed over heads. This works
whatever attention backend the tower runs (eager, SDPA, flash), because the
projections are ordinary `nn.Linear` calls in all of them, and it costs
`O(heads x tokens)` per layer instead of the `O(layers x heads x tokens^2)` that
`output_attentions=True` materialises.
"""

from __future__ import annotations

import dataclasses
from types import TracebackType
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """Where one layer's attention can be observed."""

    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    scale: float
    """Multiplier of q . k before the softmax (head_dim ** -0.5 for CLIP)."""


def cls_attention_row(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int,
                      scale: float) -> torch.Tensor:
    """The CLS query's attention over all tokens, summed over heads.

    q_cls: `(N, D)`; keys: `(N, T, D)` with T including the CLS token.
    Returns `(N, T)` fp32; each row sums to `num_heads`.
    """
    n, t, d = keys.shape
    q = q_cls.float().view(n, num_heads, d // num_heads)
    k = keys.float().view(n, t, num_heads, d // num_heads)
    scores = torch.einsum("nhd,nthd->nht", q, k) * scale
    return scores.softmax(dim=-1).sum(dim=1)


class ClsAttentionProbe:
    """Context manager that records CLS-row attention (CLS column dropped) per layer.

    After the forward pass, `attention[layer]` is `(N, T-1)` fp32 and, for layers in
    `keep_keys`, `keys[layer]` is `(N, T-1, D)`: the patch tokens' keys.
    """

    def __init__(self, sites: dict[int, AttentionSite], keep_keys: frozenset[int] = frozenset()):
        self.sites = sites
        self.keep_keys = keep_keys
        self.attention: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ClsAttentionProbe:
        for layer, site in self.sites.items():
            self._handles.append(site.q_proj.register_forward_hook(self._hook(layer, "q")))
            self._handles.append(site.k_proj.register_forward_hook(self._hook(layer, "k")))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _hook(self, layer: int, role: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            # Keep only the CLS query row; keys are needed whole but only until q arrives.
            pending = self._pending.setdefault(layer, {})
            pending[role] = output[:, 0].detach() if role == "q" else output.detach()
            if len(pending) == 2:
                self._record(layer, pending.pop("q"), pending.pop("k"))
        return hook

    def _record(self, layer: int, q_cls: torch.Tensor, keys: torch.Tensor) -> None:
        site = self.sites[layer]
        self.attention[layer] = cls_attention_row(q_cls, keys, site.num_heads, site.scale)[:, 1:]
        if layer in self.keep_keys:
            self.keys[layer] = keys[:, 1:]
