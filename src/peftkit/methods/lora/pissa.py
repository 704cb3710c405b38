"""PiSSA and OLoRA: LoRA whose factors start from the base weight's principal directions.

PiSSA: Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models" (2024), arXiv:2404.02948 — A, B from the top-r singular triplets of W.
OLoRA: Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models" (2024),
arXiv:2406.01775 — A, B from the thin QR decomposition of W.

Both train ``W_res + s·B·A`` where ``W_res = W − s·B₀·A₀`` is W with the initial product removed, so
the wrapped model starts as the base model. peftkit keeps W untouched and computes the residual as
``W x − s·B₀(A₀ x)`` with A₀, B₀ frozen buffers (see docs/design.md): same outputs and gradients as
writing W_res into the base, while disabling, deleting and unloading give the original model back
and other adapters can share the layer.

Files: a saved adapter holds A and B with ``init_lora_weights="pissa"`` (or ``"olora"``); loading
re-derives A₀, B₀ from the same base, as Hugging Face PEFT does (deterministic for ``"pissa"`` and
``"olora"``, not for the randomized ``"pissa_niter_K"``). :func:`convert_to_lora` writes a plain LoRA
of rank 2r, ``[A; A₀]`` and ``[B, −B₀]``, that any LoRA loader applies to the original base.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from peftkit.core.adapter_config import config_from_dict, config_to_json
from peftkit.core.layer import AdapterLayer
from peftkit.foundation.io import CONFIG_NAME, KEY_PREFIX, read_adapter, write_adapter
from peftkit.foundation.modules import is_conv1d
from peftkit.methods.lora.adapters import LoraLinear

PRINCIPAL_INIT = re.compile(r"pissa(_niter_(\d+))?|olora")  # init_lora_weights values handled here


def is_principal_init(init: object) -> bool:
    """Whether ``init_lora_weights`` names PiSSA (``"pissa"``, ``"pissa_niter_K"``) or OLoRA."""
    return isinstance(init, str) and PRINCIPAL_INIT.fullmatch(init) is not None


def pissa_factors(weight: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """A, B from the top-r singular triplets: ``s·B·A = U_r S_r V_rᵀ``.

    Args:
        weight: (out, in), float32.
        r: rank.
        scaling: s; the singular values are divided by it so that ``s·B·A`` is the principal part.
        niter: None for the exact SVD; else ``torch.svd_lowrank`` with this many subspace iterations.

    Returns:
        A (r, in) = sqrt(S_r/s)·V_rᵀ and B (out, r) = U_r·sqrt(S_r/s).
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)  # (out, r), (r,), (in, r)
        Vh = V.T
    root = torch.sqrt(S / scaling)  # (r,)
    return root.unsqueeze(1) * Vh, U * root.unsqueeze(0)


def olora_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """A, B from the thin QR decomposition ``W = Q R``: A = R[:r] (r, in), B = Q[:, :r] (out, r).

    Args:
        weight: (out, in), float32.
    """
    Q, R = torch.linalg.qr(weight)  # (out, k), (k, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()


class PrincipalLoraLinear(LoraLinear):
    """LoRA initialised by PiSSA or OLoRA on ``nn.Linear`` / ``Conv1D``; the residual computed on the fly.

    ``y = W x + b + s·B(A(dropout(x))) − s·B₀(A₀ x)`` with A₀, B₀ the initial factors (frozen buffers).

    Raises:
        ValueError: the base is not Linear/Conv1D or not floating point, or r exceeds min(in, out).
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0) -> None:
        if not (isinstance(base, nn.Linear) or is_conv1d(base)) or not base.weight.is_floating_point():
            raise ValueError(
                f"PiSSA/OLoRA initialisation supports floating-point nn.Linear and Conv1D layers, not "
                f"{type(base).__name__} ({base.weight.dtype}); leave it out with exclude_modules"
            )
        if r > min(base.weight.shape):
            raise ValueError(
                f"r={r} exceeds min(in, out)={min(base.weight.shape)} of a {tuple(base.weight.shape)} "
                "weight: PiSSA/OLoRA take r principal directions; lower r (or use rank_pattern)"
            )
        super().__init__(base, r, scaling, dropout)
        self.register_buffer("initial_A", torch.empty_like(self.lora_A.weight), persistent=False)
        self.register_buffer("initial_B", torch.empty_like(self.lora_B.weight), persistent=False)

    def reset_parameters(self, init: bool | str, base: nn.Module | None = None) -> None:
        """A, B (and A₀, B₀) from the principal directions of ``base``'s weight."""
        if base is None or not is_principal_init(init):
            raise ValueError(
                f"{type(self).__name__} needs the base layer and a PiSSA/OLoRA init, got {init!r}"
            )
        weight = base.weight.detach().float()
        weight = weight.T if self.transposed else weight  # (out, in)
        r = self.lora_A.out_features
        if init == "olora":
            A, B = olora_factors(weight, r)
        else:
            niter = PRINCIPAL_INIT.fullmatch(init).group(2)
            A, B = pissa_factors(weight, r, self.scaling, int(niter) if niter else None)
        with torch.no_grad():
            for param, buffer, value in (
                (self.lora_A.weight, self.initial_A, A),
                (self.lora_B.weight, self.initial_B, B),
            ):
                param.copy_(value)
                buffer.copy_(value)

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        """x: (..., in); base_output: (..., out) → (..., out)."""
        adapted = super().forward(base, x, base_output)
        x = x.to(self.initial_A.dtype)
        initial = (
            (x @ self.initial_A.T) @ self.initial_B.T * self.scaling
        )  # (..., out), no dropout: part of W_res
        return adapted - initial.to(adapted.dtype)

    def delta_weight(self) -> Tensor:
        """s·(B·A − B₀·A₀) in the base weight's layout."""
        delta = (self.lora_B.weight @ self.lora_A.weight - self.initial_B @ self.initial_A) * self.scaling
        return delta.T if self.transposed else delta


def convert_to_lora(
    model: nn.Module,
    save_dir: str | os.PathLike[str],
    adapter_name: str = "default",
    initial_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Save a PiSSA/OLoRA adapter as a plain rank-2r LoRA giving the same model on the *original* base.

    ``s·(B·A − B₀·A₀) = s'·[B, −B₀]·[A; A₀]`` with ``r' = 2r`` and ``lora_alpha`` doubled (``× √2`` with
    rsLoRA) so that ``s' = s``; ``rank_pattern`` and ``alpha_pattern`` are adjusted the same way.
    Written like :meth:`PeftModel.save_pretrained` (``save_dir/<name>/`` unless ``"default"``).

    Args:
        model: a :class:`peftkit.PeftModel` holding the adapter.
        save_dir: where to write the converted adapter.
        adapter_name: the PiSSA/OLoRA adapter to convert.
        initial_dir: an adapter directory saved right after wrapping (before training) whose A, B are
            used as A₀, B₀; by default the initial factors kept in memory are used.

    Raises:
        ValueError: the adapter is not a PiSSA/OLoRA LoRA adapter, or ``initial_dir`` does not fit it.
    """
    config = model.peft_config[adapter_name]
    if config.peft_type != "LORA" or not is_principal_init(config.init_lora_weights):
        raise ValueError(
            f"adapter {adapter_name!r} is not a PiSSA/OLoRA adapter (init_lora_weights="
            f"{getattr(config, 'init_lora_weights', None)!r}); it loads on the original base as it is"
        )
    subdir = Path() if adapter_name == "default" else Path(adapter_name)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter_name])
        data, tensors = read_adapter(Path(tmp) / subdir)
    initial = _initial_factors(model.model, adapter_name)
    if initial_dir is not None:
        initial = _initial_factors_from(Path(initial_dir), initial)
    for prefix, (A0, B0) in initial.items():
        A, B = tensors[prefix + "lora_A.weight"], tensors[prefix + "lora_B.weight"]
        tensors[prefix + "lora_A.weight"] = torch.cat([A, A0], dim=0)  # (2r, in)
        tensors[prefix + "lora_B.weight"] = torch.cat([B, -B0], dim=1)  # (out, 2r)
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    converted = config_from_dict(data, {"LORA": type(config)}).replace(
        r=2 * config.r,
        lora_alpha=alpha_factor * config.lora_alpha,
        rank_pattern={key: 2 * value for key, value in config.rank_pattern.items()},
        alpha_pattern={key: alpha_factor * value for key, value in config.alpha_pattern.items()},
        init_lora_weights=True,
    )
    write_adapter(Path(save_dir) / subdir, config_to_json(converted), tensors)


def _initial_factors(model: nn.Module, adapter_name: str) -> dict[str, tuple[Tensor, Tensor]]:
    """File-key prefix → (A₀, B₀) of every PiSSA/OLoRA layer of the adapter, from memory."""
    found = {}
    for path, module in model.named_modules():
        if not isinstance(module, AdapterLayer) or adapter_name not in module.adapters:
            continue
        adapter = module.adapters[adapter_name]
        if isinstance(adapter, PrincipalLoraLinear):
            found[f"{KEY_PREFIX}{path}."] = (
                adapter.initial_A.detach().cpu(),
                adapter.initial_B.detach().cpu(),
            )
    return found


def _initial_factors_from(
    directory: Path, expected: dict[str, tuple[Tensor, Tensor]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """A₀, B₀ read from an initial adapter directory, checked against the layers of the adapter."""
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(
            f"initial_dir {str(directory)!r} has no {CONFIG_NAME}: save the adapter there right after "
            "wrapping, before training"
        )
    _, tensors = read_adapter(directory)
    found = {}
    for prefix, (A0, B0) in expected.items():
        keys = (prefix + "lora_A.weight", prefix + "lora_B.weight")
        if any(key not in tensors for key in keys):
            raise ValueError(
                f"initial_dir {str(directory)!r} lacks {keys[0]}: it is not this adapter's initial state"
            )
        A, B = tensors[keys[0]], tensors[keys[1]]
        if A.shape != A0.shape or B.shape != B0.shape:
            raise ValueError(
                f"initial_dir {str(directory)!r}: {keys[0]} has shape {tuple(A.shape)} but the adapter's is "
                f"{tuple(A0.shape)} (another rank or base model?)"
            )
        found[prefix] = (A.to(A0.dtype), B.to(B0.dtype))
    return found
