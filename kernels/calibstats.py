"""Calibration statistics of each layer's input, gathered once and shared by every quantizer method
and by sensitivity scoring.

Per layer, over every calibration token x (one row of the layer's (M, K) matmul input; for convs a
row of the im2col matrix, so K = in_channels/groups · kh · kw like the 2-D weight):

    xtx       (K, K) fp32   Σ x xᵀ           GPTQ's Hessian is H = 2 · xtx / n_tokens
    abs_sum   (K,)   fp32   Σ |x|            AWQ's activation magnitude is abs_sum / n_tokens
    n_tokens  int           number of rows accumulated

From these, the mean squared output error of any weight perturbation ΔW on the calibration tokens
is exact: ``E‖ΔW x‖² = tr(ΔW · xtx · ΔWᵀ) / n_tokens`` (:meth:`LayerStats.output_error`), so methods
and estimators never need to keep activations.

Gathering works per submodule (forward pre-hooks on the modules you name), so a whole-model pass
(:func:`gather_stats`) and a block-by-block streaming pass for causal LMs (:class:`StatsCollector`
around one block's forward, then the next block) fill the same objects. Padding tokens are left out
when a token mask is known (``attention_mask`` of a dict batch, or ``StatsCollector.token_mask``):
they reach no output, and counting them would bend the statistics towards padding.

Memory: 4·K² + 4·K bytes per layer (K=1536: 9.4 MB). Layers reading the same tensor (q/k/v) get
equal statistics, each its own copy.

Example:
    >>> stats = gather_stats(model, calib_batches)                    # {fqn: LayerStats}
    >>> q = quantize(w, 4, 128, method="gptq", stats=stats["encoder.layer.0.attention.self.query"])
    >>> with StatsCollector({"mlp.fc1": block.mlp.fc1}) as col:       # streaming: one block at a time
    ...     block(hidden)
    >>> col.stats["mlp.fc1"].n_tokens
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.batches import as_batches, run_model

__all__ = ["LayerStats", "StatsCollector", "gather_stats", "layer_input_2d", "stats_supported"]


@dataclass(eq=False)
class LayerStats:
    """Sufficient statistics of one layer's calibration inputs (see the module docstring)."""
    xtx: torch.Tensor          # (K, K) fp32: Σ over tokens of x xᵀ
    abs_sum: torch.Tensor      # (K,) fp32: Σ over tokens of |x|
    n_tokens: int = 0          # tokens (rows) accumulated

    @classmethod
    def zeros(cls, k: int, device=None) -> "LayerStats":
        """Empty statistics for a layer with ``k`` input channels."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be a positive int (the layer's input channels)")
        return cls(torch.zeros(k, k, device=device), torch.zeros(k, device=device), 0)

    @property
    def k(self) -> int:
        return int(self.abs_sum.shape[0])

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "LayerStats":
        """Accumulate tokens ``x`` (M, K) (any float dtype); returns self."""
        if x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"update expects (M, {self.k}) inputs, got shape {tuple(x.shape)}")
        x = x.detach().float()
        self.xtx.addmm_(x.t(), x)                                   # (K, K) += (K, M) @ (M, K)
        self.abs_sum.add_(x.abs().sum(0))                           # (K,)
        self.n_tokens += int(x.shape[0])
        return self

    def merge(self, other: "LayerStats") -> "LayerStats":
        """Statistics of both token sets (e.g. from two ranks or two passes); a new object."""
        if other.k != self.k:
            raise ValueError(f"cannot merge stats of K={self.k} and K={other.k}")
        return LayerStats(self.xtx + other.xtx, self.abs_sum + other.abs_sum,
                          self.n_tokens + other.n_tokens)

    @property
    def mean_abs(self) -> torch.Tensor:
        """(K,) mean |x| per input channel (AWQ's activation magnitude)."""
        return self.abs_sum / max(self.n_tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """(K, K) H = 2 · E[x xᵀ]: the Hessian of the mean squared layer output error in each row."""
        return self.xtx * (2.0 / max(self.n_tokens, 1))

    def output_error(self, dw: torch.Tensor) -> float:
        """Mean over calibration tokens of ‖ΔW x‖² for ``dw`` (N, K) — exact, from xtx alone.

        Example: ``stats.output_error(fake_quantize(w, 4) - w)``
        """
        if dw.dim() != 2 or dw.shape[1] != self.k:
            raise ValueError(f"output_error expects (N, {self.k}) weight deltas, got {tuple(dw.shape)}")
        dw = dw.float()
        return float(((dw @ self.xtx) * dw).sum()) / max(self.n_tokens, 1)

    @property
    def nbytes(self) -> int:
        return self.xtx.numel() * self.xtx.element_size() + self.abs_sum.numel() * self.abs_sum.element_size()


def _layer_kind(module: nn.Module) -> str | None:
    from ..core.graph import layer_kind                 # imported here: keeps this module light
    return layer_kind(module)


def stats_supported(module: nn.Module) -> str | None:
    """None when statistics can be gathered for ``module``, else the reason why not."""
    kind = _layer_kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a quantizable layer (Linear, Conv1d/2d, HF Conv1D)"
    if kind == "embedding":
        return "an embedding table has no input activations (its input is token ids)"
    if kind in ("conv1d", "conv2d"):
        if module.groups != 1:
            return (f"grouped conv (groups={module.groups}): each group of output channels sees "
                    "other inputs, one K x K statistic cannot describe it")
        if module.padding_mode != "zeros":
            return f"conv padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    return None


def _same_padding(kernel, dilation) -> list[int]:
    """F.pad amounts (last dim first) for padding='same' with stride 1."""
    pads = []
    for k, d in reversed(list(zip(kernel, dilation))):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


def layer_input_2d(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The (M, K) matrix the layer's 2-D weight (N, K) multiplies, from its input ``x``.

    linear / hf_conv1d: ``x.reshape(-1, K)``; conv: im2col (``F.unfold``), channel-major like
    ``weight.reshape(N, -1)``, zero padding included (it is real input to the conv).
    """
    if kind in ("linear", "hf_conv1d"):
        return x.reshape(-1, x.shape[-1])
    nd = 2 if kind == "conv2d" else 1
    if x.dim() == nd + 1:                                           # unbatched input
        x = x.unsqueeze(0)
    ks, st, dil = module.kernel_size, module.stride, module.dilation
    pad = module.padding
    if isinstance(pad, str):
        if pad == "same":
            x = F.pad(x, _same_padding(ks, dil))
        pad = (0,) * nd
    if nd == 1:                                                     # (B, C, L) -> (B, C, 1, L)
        x, ks, st, dil, pad = x.unsqueeze(2), (1, ks[0]), (1, st[0]), (1, dil[0]), (0, pad[0])
    cols = F.unfold(x, ks, dilation=dil, padding=pad, stride=st)    # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])          # (B*L, K)


class StatsCollector:
    """Forward pre-hooks that accumulate :class:`LayerStats` for the named modules while active.

    ``token_mask`` (B, T) bool/int, optional, set before each forward: rows of a (B, T, K) input
    where it is 0 are skipped (padding). Works on any submodule: a whole model or one block.

    Example:
        >>> with StatsCollector({"fc1": model.fc1, "fc2": model.fc2}) as col:
        ...     for x in batches: model(x)
        >>> col.stats["fc1"].n_tokens
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        if not isinstance(modules, Mapping) or not modules:
            raise ValueError("StatsCollector needs a non-empty mapping {name: module}")
        self.kinds = {}
        for name, mod in modules.items():
            why = stats_supported(mod) if isinstance(mod, nn.Module) else "not an nn.Module"
            if why is not None:
                raise ValueError(f"cannot gather input statistics for {name!r}: {why}")
            self.kinds[name] = _layer_kind(mod)
        self.modules = dict(modules)
        self.stats: dict[str, LayerStats] = {}
        self.token_mask: torch.Tensor | None = None
        self._handles = []

    def _hook(self, name: str):
        mod, kind = self.modules[name], self.kinds[name]

        def fn(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            with torch.no_grad():
                m = self.token_mask
                if (kind in ("linear", "hf_conv1d") and m is not None and x.dim() == 3
                        and tuple(x.shape[:2]) == tuple(m.shape)):
                    x = x[m.to(torch.bool)]                              # (M valid, K)
                x2 = layer_input_2d(mod, kind, x)                        # (M, K)
                if name not in self.stats:
                    self.stats[name] = LayerStats.zeros(int(x2.shape[1]), device=x2.device)
                self.stats[name].update(x2)
        return fn

    def __enter__(self) -> "StatsCollector":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def gather_stats(model: nn.Module, calib_data, names=None, mask: str | None = "auto", forward=None) -> dict:
    """One forward pass over ``calib_data`` filling :class:`LayerStats` for each quantizable layer.

    ``names``: fqns to gather (default: every quantizable layer statistics support — grouped convs
    are skipped; naming one raises). ``forward(model, batch)`` runs a batch (default: tensor ->
    ``model(x)``, tuple -> ``model(*b)``, dict -> ``model(**b)``), e.g. the user's loss function. ``mask="auto"`` skips padding tokens of dict batches carrying an
    ``attention_mask``; ``mask=None`` counts every token. The model is not modified (hooks are removed,
    no parameter or buffer changes; run it in eval mode yourself if it has dropout/BN).

    Example: ``stats = gather_stats(model, batches)``; ``stats[fqn].hessian`` is (K, K)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mask not in ("auto", None):
        raise ValueError(f"mask={mask!r}; allowed: 'auto' (skip attention_mask padding) or None")
    batches = as_batches(calib_data)
    if names is None:
        modules = {n: m for n, m in model.named_modules()
                   if _layer_kind(m) is not None and getattr(m, "weight", None) is not None
                   and stats_supported(m) is None}
    else:
        all_mods = dict(model.named_modules())
        missing = [n for n in names if n not in all_mods]
        if missing:
            raise ValueError(f"layers not in {type(model).__name__}: {missing}")
        modules = {n: all_mods[n] for n in names}
    if not modules:
        raise ValueError(f"{type(model).__name__} has no layer to gather input statistics for")
    col = StatsCollector(modules)
    with col, torch.no_grad():
        for b in batches:
            am = b.get("attention_mask") if mask == "auto" and isinstance(b, Mapping) else None
            col.token_mask = am if isinstance(am, torch.Tensor) and am.dim() == 2 else None
            (forward or run_model)(model, b)
    not_run = [n for n in modules if n not in col.stats]
    if not_run:
        raise ValueError(f"layers never ran on the calibration batches: {not_run}")
    return col.stats
