"""Ablation applied to a model as PEFT LoRA adapters on the frozen weights.

Every target weight of the architecture map gets a LoRA adapter (fused 3-D expert tensors through
PEFT's `target_parameters`). A trial writes its factors B A into the adapters, and for the exact
norm-preserving ablation a per-row scale of each module's output; resetting zeroes them, so the model
is never reloaded between trials.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import zlib
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..errors import HereticError
from ..model.architecture import ArchitectureMap, Target, as_matrices
from ..model.offload import execution_device, offloaded_entries, stored_tensor
from .kernels import Factors, ablation_factors, norm_preserving_factors, row_norms, through_norm
from .parameters import AblationParameters

ADAPTER = "default"


class Ablator:
    """Owns the LoRA adapters of a model and writes trials into them."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchitectureMap,
        mode: str,
        rank: int,
        seed: int,
        subspace_rank: int = 1,
        exact: bool = True,
    ) -> None:
        self.arch = arch
        self.mode = mode
        # The full ablation is exact (rank k and a per-row output scale) unless asked otherwise or the model
        # has fused expert tensors (their adapters cannot scale one expert's output): then a rank-r approximation.
        self.exact = mode == "full" and exact and not arch.fused_experts
        # A k-dimensional subspace needs rank k (none, pre, exact full); an approximation gets k - 1 more.
        self.full_rank = rank
        self.subspace_rank = subspace_rank
        self.rank = rank + subspace_rank - 1 if mode == "full" and not self.exact else subspace_rank
        self.seed = seed
        # (layers + 1, k, hidden) orthonormal bases whose first rows are the directions; when set (k > 1)
        # they are ablated in place of the directions passed to apply / factors / merged_state_dict.
        self.subspace: torch.Tensor | None = None
        self.base_model = model
        # Original parameters, by their original names (shared storage, no copy), captured before wrapping;
        # those of offloaded modules (meta) are read from accelerate's hooks when needed (`stored_tensor`).
        self.original_state = dict(model.state_dict(keep_vars=False))
        self._offloaded = offloaded_entries(model)
        refuse_offloaded_experts(arch, self._offloaded)
        self._owners = {target.name: (model.get_submodule(target.module), target.parameter) for _, _, target in arch.targets()}
        self._norm_scales = norm_scales(model, arch)
        unfused = sorted({target.module for _, _, target in arch.targets() if not target.fused})
        fused = sorted({target.name for _, _, target in arch.targets() if target.fused})
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,  # scaling alpha / r = 1: the adapter adds exactly B A
            lora_dropout=0.0,
            bias="none",
            target_modules=unfused or None,
            target_parameters=fused or None,
            init_lora_weights=True,
        )
        self.peft_model: PeftModel = with_adapters(model, config)
        self.peft_model.eval()
        self._lora_layers = {target.name: self._find_lora(target) for _, _, target in arch.targets()}
        self._place_offloaded_adapters()
        # Per-row output scales of the exact full ablation, applied by a forward hook on each adapted module.
        self._scales: dict[str, torch.Tensor] = {}
        if self.exact:
            for name, lora in self._lora_layers.items():
                lora.register_forward_hook(self._scale_hook(name))
        self.reset()

    def _scale_hook(self, name: str) -> Callable[[nn.Module, object, torch.Tensor], torch.Tensor]:
        """y = diag(s) (M x + B A x): the adapted module's output scaled row by row (in float32, then back),
        unless the trial leaves the module alone or the adapters are switched off."""

        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            scale = self._scales.get(name)
            if scale is None or getattr(module, "disable_adapters", False):
                return output
            if scale.device != output.device:  # kept where the outputs are computed (offloaded layers)
                scale = self._scales[name] = scale.to(output.device)
            return (output * scale).to(output.dtype)  # float32 scale: the product is computed in float32

        return hook

    def _place_offloaded_adapters(self) -> None:
        """PEFT creates the adapters of an offloaded module on the meta device, beside its weight: they are
        made real on the module's execution device, where accelerate's hook computes the module."""
        for name, lora in self._lora_layers.items():
            if name not in self._offloaded:
                continue
            device = execution_device(self._owners[name][0], torch.device("cpu"))
            for adapters in (lora.lora_A, lora.lora_B):
                adapters[ADAPTER].to_empty(device=device)

    def _find_lora(self, target: Target) -> nn.Module:
        if not target.fused:
            return self.base_model.get_submodule(target.module)
        # Fused tensors: the ParamWrapper that replaced the experts module wraps this parameter.
        module = self.base_model.get_submodule(target.module)
        while module is not None:
            if getattr(module, "parameter_name", None) == target.parameter:
                return module
            module = getattr(module, "base_layer", None)
        raise RuntimeError(f"no adapter was created for {target.name}")

    # --- Writing adapters ---------------------------------------------------------------------

    def reset(self) -> None:
        """The unmodified model: every adapter's B set to zero, and A too (PEFT initializes A at random, which
        a saved adapter would otherwise carry for the weights a trial leaves alone: not reproducible)."""
        self.unchanged_layers = self.arch.num_layers
        self._scales.clear()
        with torch.no_grad():
            for lora in self._lora_layers.values():
                lora.lora_B[ADAPTER].weight.zero_()
                lora.lora_A[ADAPTER].weight.zero_()

    def factors(self, parameters: AblationParameters, directions: torch.Tensor) -> Iterator[tuple[Target, Factors]]:
        """(target, its factors) for every target with a non-zero weight."""
        for layer, component, target in self.arch.targets():
            if parameters.weight(component, layer) == 0.0:
                continue
            yield target, self.factors_for(self._dense(target), layer, component, target, parameters, directions)

    def factors_for(
        self,
        matrices: torch.Tensor,
        layer: int,
        component: str,
        target: Target,
        parameters: AblationParameters,
        directions: torch.Tensor,
    ) -> Factors:
        """The factors of one target, computed from `matrices` (experts, hidden, in): the model's weight, or
        the same weight read again in full precision (a quantized model's merge)."""
        weight = parameters.weight(component, layer)
        source = self.subspace if self.subspace is not None else directions
        direction = parameters.direction_for(source, layer).to(matrices.device)
        if target.name in self._norm_scales:  # the output passes through a norm: ablate the direction it maps to r
            direction = through_norm(direction, self._norm_scales[target.name].to(matrices.device))
        if self.exact:
            return norm_preserving_factors(matrices, direction, weight)
        seed = zlib.crc32(f"{self.seed}:{target.name}".encode())
        extra = direction.shape[0] - 1 if direction.dim() == 2 else 0  # a k-dimensional subspace: k - 1
        return Factors(*ablation_factors(matrices, direction, weight, self.mode, self.full_rank + extra, seed))

    def changed_parameters(self, parameters: AblationParameters) -> set[str]:
        """State-dict names of the weights this ablation changes (non-zero kernel weight)."""
        return {target.name for layer, component, target in self.arch.targets() if parameters.weight(component, layer) != 0.0}

    def original_weight(self, target: Target) -> torch.Tensor:
        """The target's parameter as the model holds it (on the meta device when offloaded), from its module
        before PEFT wrapped it: a fused experts module is replaced by a wrapper without that attribute."""
        module, parameter = self._owners[target.name]
        weight: torch.Tensor = getattr(module, parameter)
        return weight

    def _weight(self, target: Target) -> torch.Tensor:
        """The target's original weight (read from its offload hook when the module is offloaded)."""
        module, parameter = self._owners[target.name]
        return stored_tensor(module, parameter)

    def _dense(self, target: Target) -> torch.Tensor:
        return as_matrices(self._weight(target), target, self._owners[target.name][0])

    @torch.no_grad()
    def apply(self, parameters: AblationParameters, directions: torch.Tensor) -> None:
        self.reset()
        self.unchanged_layers = 0  # unknown until every adapter is written
        for target, factors in self.factors(parameters, directions):
            self._write(target, factors.b, factors.a)
            if factors.scale is not None:
                self._scales[target.name] = factors.scale[0]
        self.unchanged_layers = first_changed_layer(parameters, self.arch)

    def _write(self, target: Target, b: torch.Tensor, a: torch.Tensor) -> None:
        lora = self._lora_layers[target.name]
        if target.fused and target.out_axis == 2 and not getattr(self._owners[target.name][0], "is_transposed", False):
            # PEFT takes a fused tensor whose module does not say `is_transposed` for (experts, out, in): the
            # stored (experts, in, hidden) is M^T = A^T B^T, its adapter's B is A^T and its A is B^T.
            b, a = a.transpose(1, 2), b.transpose(1, 2)
        weight_a = lora.lora_A[ADAPTER].weight
        weight_b = lora.lora_B[ADAPTER].weight
        experts, out, rank = b.shape
        padded_b = torch.zeros((experts, out, self.rank), dtype=b.dtype, device=b.device)
        padded_a = torch.zeros((experts, self.rank, a.shape[-1]), dtype=a.dtype, device=a.device)
        padded_b[:, :, :rank], padded_a[:, :rank, :] = b, a
        if not target.fused:
            weight_a.copy_(padded_a[0])
            weight_b.copy_(padded_b[0])
            return
        # PEFT's layout for E experts: A rows grouped by expert (E*r, in); B columns as (r, E).
        weight_a.copy_(padded_a.reshape(experts * self.rank, -1))
        weight_b.copy_(padded_b.permute(1, 2, 0).reshape(out, self.rank * experts))

    def describe(self) -> str:
        """How the ablation is stored, in words: "full, exact", "full, rank-3 approximation", "pre", "none"."""
        if self.mode != "full":
            return self.mode
        return "full, exact" if self.exact else f"full, rank-{self.rank} approximation"

    def dora_magnitudes(self) -> dict[str, torch.Tensor]:
        """{module: its original row norms n (out,)}: the magnitudes of a DoRA adapter equal to the exact full
        ablation, since DoRA computes W' = diag(m / row norms of (W + B A)) (W + B A) = diag(s) (W + B A)."""
        return {target.module: row_norms(self._dense(target))[0] for _, _, target in self.arch.targets()}

    # --- Merged weights -----------------------------------------------------------------------

    @torch.no_grad()
    def merged_state_dict(self, parameters: AblationParameters, directions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The original state dict with every ablated weight replaced by its ablation (in its own dtype and
        layout). The merged weights are moved to the CPU one by one as they are made: on a GPU, the model's
        memory holds one merged matrix at a time, never a second copy of every ablated weight."""
        state = dict(self.original_state)
        for name, (module, key) in self._offloaded.items():
            state[name] = stored_tensor(module, key)
        for target, factors in self.factors(parameters, directions):
            original = self._weight(target)
            merged = factors.merged(self._dense(target)).to("cpu", original.dtype)
            if target.fused:
                merged = merged if target.out_axis == 1 else merged.transpose(1, 2)
                state[target.name] = merged.contiguous()
            else:
                state[target.name] = (merged[0] if target.out_axis == 0 else merged[0].T).contiguous()
        return state


def with_adapters(model: nn.Module, config: LoraConfig) -> PeftModel:
    """The model wrapped by PEFT with the adapters of `config`; a family PEFT refuses is refused in one sentence.

    PEFT rewrites the targets of some MoE families for adapters trained under transformers 4: any module
    ending in down_proj is taken for an expert of the fused v5 tensor and dropped (shared experts, dense
    layers). The targets here are this model's own names, so that rewrite is skipped."""
    with skipping_transformers4_conversion():
        try:
            return get_peft_model(model, config, autocast_adapter_dtype=True)
        except ValueError as error:  # PEFT refuses some modules of some families (Mamba 2's out_proj)
            raise HereticError(
                f"PEFT cannot put adapters on the weights ablated in {type(model).__name__} ({str(error).strip()}); this "
                "architecture is not supported."
            ) from None


def skipping_transformers4_conversion() -> contextlib.AbstractContextManager[object]:
    """A context in which PEFT does not rewrite adapter targets for transformers 4 checkpoints (PEFT versions
    without that rewrite: nothing to skip)."""
    try:
        importlib.import_module("peft.utils.transformers_weight_conversion")
    except ImportError:
        return contextlib.nullcontext()
    return mock.patch("peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers")


def norm_scales(model: nn.Module, arch: ArchitectureMap) -> dict[str, torch.Tensor]:
    """The scale g (hidden,) of the RMS norm each target's output passes through, by target (Target.post_norm)."""
    return {
        target.name: norm_scale(model.get_submodule(target.post_norm), arch.hidden_size)
        for _, _, target in arch.targets()
        if target.post_norm is not None
    }


def norm_scale(norm: nn.Module, hidden_size: int) -> torch.Tensor:
    """The scale g (hidden,) of an RMS norm y -> g * y / rms(y), read from the norm itself (Gemma's 1 + w
    as well as Llama's w): its output on a vector of ones, checked on a random vector (float32 copy)."""
    probe = copy.deepcopy(norm).float()
    with torch.no_grad():
        eps = float(getattr(probe, "eps", None) or getattr(probe, "variance_epsilon", None) or 0.0)
        scale = probe(torch.ones(1, hidden_size))[0] * math.sqrt(1.0 + eps)  # (hidden,)
        x = torch.randn(1, hidden_size, generator=torch.Generator().manual_seed(0))
        expected = scale * x / x.pow(2).mean().sqrt()
        if not torch.allclose(probe(x), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max())):
            raise HereticError(
                f"The norm {type(norm).__name__} after an ablated projection is not an RMS norm; ablating through it "
                "is not supported."
            )
    return scale


def refuse_offloaded_experts(arch: ArchitectureMap, offloaded: dict[str, object]) -> None:
    """Fused expert tensors (3-D parameters that PEFT adapts through `target_parameters`) cannot be adapted
    while accelerate keeps them offloaded on the meta device: refused in one sentence."""
    names = [target.name for _, _, target in arch.targets() if target.fused and target.name in offloaded]
    if names:
        raise HereticError(
            f"The fused expert weights of this MoE model ({names[0]} and {len(names) - 1} more) are offloaded to the CPU "
            "or disk, where they cannot be ablated; give --max-memory room for every layer on the devices, or use "
            "--quantization bnb-4bit."
        )


def first_changed_layer(parameters: AblationParameters, arch: ArchitectureMap) -> int:
    """The lowest layer with a non-zero kernel weight: the layers below it are the original's (the number
    of layers when the ablation changes none)."""
    changed = [layer for layer, component, _ in arch.targets() if parameters.weight(component, layer) != 0.0]
    return min(changed, default=arch.num_layers)
