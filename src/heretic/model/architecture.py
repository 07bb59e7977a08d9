"""Architecture map: the transformer layers and, per layer, the weights that write into the residual stream.

Components group those weights by role:
  "attn" - attention output projections, and the output projections of attention-like token
           mixers in hybrid layers (linear attention, SSM / convolution blocks);
  "mlp"  - MLP down projections, every MoE expert's down projection (separate modules or one fused
           3-D tensor), and shared experts.
Every weight is seen as M (hidden_size x in_features) acting as y = M x, so that ablation math
needs no knowledge of the storage layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import HereticError

COMPONENTS = ("attn", "mlp")

# Last name of a module whose output is added to the residual stream.
OUTPUT_PROJECTIONS = {
    "o_proj",
    "out_proj",
    "dense",
    "c_proj",
    "wo",
    "down_proj",
    "w2",
    "fc2",
    "dense_4h_to_h",
    "proj_out",
    "output_proj",
    "o",
    "c_fc2",
    "output_linear",
    "per_layer_projection",
    "fc_out",
    "proj_down",
    "Wo",
    "linear_out",
}
# Last names of modules that read the residual stream or work inside a block (never write into the
# residual stream): not ablated, and not reported as unrecognized when their output happens to have
# the hidden size (a query projection of num_heads x head_dim = hidden_size).
INPUT_PROJECTIONS = {
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "query_key_value",
    "c_attn",
    "in_proj",
    "in_proj_qkvz",
    "in_proj_ba",
    "in_proj_qkv",
    "in_proj_z",
    "in_proj_a",
    "in_proj_b",
    "fc_in",
    "weights_proj",
    "g_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "w1",
    "w3",
    "input_linear",
    "router",
    "gate",
    "c_fc",
    "dense_h_to_4h",
    "fc1",
    "x_proj",
    "dt_proj",
    "r_proj",
    "output_gate",
    "q",
    "k",
    "v",
    "ogate_preact",
    "igate_preact",
    "fgate_preact",
    "proj_up",
    "proj_up_gate",
    "Wi",
    "linear_x",
    "linear_y",
    "kv_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "wq",
    "wk",
    "wv",
    "wqkv",
    "Wq",
    "Wk",
    "Wv",
    "query",
    "key",
    "value",
}
# Names of fused 3-D expert tensors holding down projections.
FUSED_DOWN_PROJECTIONS = {"down_proj", "w2", "down_projs", "experts_down"}
# Path fragments that tell the role of a projection (checked in this order).
MLP_HINTS = ("mlp", "feed_forward", "ffn", "experts", "expert", "moe", "shared_expert")
ATTN_HINTS = ("attn", "attention", "mixer", "conv", "mamba", "ssm", "token_mixer", "linear_attn", "mlstm", "temporal_block")
# Output projections directly under the layer, whose role their path does not tell: Gemma 3n / 4's per-layer
# input, projected into the residual stream after the MLP, is ablated with it.
# Plain MLPs written straight into the layer (BioGPT, OPT, XGLM) end in fc2.
# JetMoE's attention is a mixture of experts whose fused output projections sit under `experts`.
ROLES = {"per_layer_projection": "mlp", "fc2": "mlp", "self_attention.experts.output_linear": "attn"}
# Norms applied to a component's output before it is added to the residual stream (Gemma 2-4, OLMo 2, GLM 4,
# HyperCLOVA X, LFM 3), by layer-relative name. "post_attention_layernorm" is such a norm only in layers that also have one of
# POST_FEEDFORWARD_NORMS (elsewhere, as in Llama, it is the MLP's input norm).
POST_NORMS = {
    "attn": ("post_self_attn_layernorm", "post_attention_layernorm", "post_norm1", "post_operator_norm"),
    "mlp": ("post_feedforward_layernorm", "post_mlp_layernorm", "post_norm2", "post_ffn_norm"),
    "per_layer_projection": ("post_per_layer_input_norm",),
}
POST_FEEDFORWARD_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "pre_feedforward_layernorm")
# Layer children that transform what enters the residual stream channel by channel, and what they do in words.
RESIDUAL_TRANSFORMS = {
    "residual_gate": "rescales the residual stream dimension by dimension in its layers",
    "_sconv": "convolves each block's output over positions, channel by channel, before adding it",
    "_convolution": "convolves each block's output over positions, channel by channel, before adding it",
}
# Module-list paths of the text decoder layers, tried first.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.text_model.layers",
    "transformer.h",
    "model.decoder.layers",
    "backbone.layers",
    "gpt_neox.layers",
    "transformer.layers",
)


@dataclass(frozen=True)
class Target:
    """One weight that writes into the residual stream.

    module: path of the module owning the parameter; parameter: its attribute name.
    fused: a 3-D (experts, ., .) tensor; out_axis: the axis of size hidden_size (of a 2-D weight: 0, or 1 for
    GPT-2's Conv1D, stored (in, out)).
    post_norm: path of an RMS norm applied to the weight's output before it is added to the residual stream
    (None: added as it is); the ablated direction is then taken through the norm's scale.
    """

    module: str
    parameter: str = "weight"
    fused: bool = False
    out_axis: int = 0
    post_norm: str | None = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.parameter}"


@dataclass
class ArchitectureMap:
    layers_path: str
    hidden_size: int
    # layers[i][component] -> targets of that component in layer i
    layers: list[dict[str, list[Target]]] = field(default_factory=list)
    # Weights inside the layers that may write into the residual stream but are not recognized as
    # output projections: not ablated, and always reported (never skipped silently).
    unrecognized: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def components(self) -> list[str]:
        present = {name for layer in self.layers for name, targets in layer.items() if targets}
        return [name for name in COMPONENTS if name in present]

    def targets(self) -> list[tuple[int, str, Target]]:
        return [
            (index, name, target)
            for index, layer in enumerate(self.layers)
            for name in COMPONENTS
            for target in layer.get(name, [])
        ]

    @property
    def fused_experts(self) -> bool:
        """True when some MoE experts are one fused 3-D tensor (their adapters cannot scale one expert's output)."""
        return any(target.fused for _, _, target in self.targets())

    def count(self, component: str) -> int:
        """Layers in which the component is present."""
        return sum(1 for layer in self.layers if layer.get(component))

    def summary(self) -> str:
        parts = []
        for name in self.components:
            targets = sum(len(layer.get(name, [])) for layer in self.layers)
            fused = sum(1 for layer in self.layers for t in layer.get(name, []) if t.fused)
            extra = f", {fused} fused expert tensors" if fused else ""
            parts.append(f"{name}: {self.count(name)} layers, {targets} weights{extra}")
        return "; ".join(parts)

    def describe(self) -> list[str]:
        """One line per layer: what it ablates, by component (module paths relative to the layer)."""
        lines = []
        for index, layer in enumerate(self.layers):
            prefix = f"{self.layers_path}.{index}."
            parts = [
                f"{name}: " + ", ".join(target.name.removeprefix(prefix) for target in layer.get(name, []))
                for name in COMPONENTS
                if layer.get(name)
            ]
            lines.append(f"layer {index}: " + "; ".join(parts))
        return lines

    def layer_kinds(self) -> list[str]:
        """describe() with layers that ablate the same weights grouped: one line per kind of layer."""
        groups: dict[str, list[int]] = {}
        for index, line in enumerate(self.describe()):
            groups.setdefault(line.split(": ", 1)[1], []).append(index)
        return [f"{_ranges(indices)}: {what}" for what, indices in groups.items()]

    def unrecognized_warning(self) -> str | None:
        """One sentence naming the weights that are not ablated because their role is not recognized."""
        if not self.unrecognized:
            return None
        shown = ", ".join(self.unrecognized[:6]) + (
            f" and {len(self.unrecognized) - 6} more" if len(self.unrecognized) > 6 else ""
        )
        return (
            f"Not ablated, because their role is not recognized: {shown}; they may write into the residual stream, "
            "so the ablation may leave part of the refusal direction in place."
        )


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "layers 0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    parts = [str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs]
    return ("layer " if len(indices) == 1 else "layers ") + ", ".join(parts)


def text_config(config: Any) -> Any:
    """The text model's part of a (possibly multimodal) transformers config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def find_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The decoder layers: a module list of `num_layers` (the config's num_hidden_layers), or of the config's
    num_layers where that differs (LongCat-Flash counts two sublayers per layer in num_hidden_layers)."""
    modules = dict(model.named_modules())
    listed = getattr(text_config(getattr(model, "config", None)), "num_layers", None)
    for count in [num_layers] + ([listed] if isinstance(listed, int) and listed != num_layers else []):
        for path in LAYER_PATHS:
            candidate = modules.get(path)
            if isinstance(candidate, nn.ModuleList) and len(candidate) == count:
                return path, candidate
        # Otherwise: the first ModuleList of that length outside vision/audio towers.
        for path, module in modules.items():
            towers = ("vision", "visual", "audio", "image", "encoder")
            if isinstance(module, nn.ModuleList) and len(module) == count and not any(part in path for part in towers):
                return path, module
    raise HereticError(
        f"Could not find the {num_layers} transformer layers of {type(model).__name__}: no module list of that "
        "length; this architecture is not supported yet."
    )


def build_architecture_map(model: nn.Module) -> ArchitectureMap:
    """The layers' output projections by component; unrecognized weights that may write into the
    residual stream are listed in `unrecognized`; unsupported layouts are refused with one sentence."""
    config = text_config(model.config)
    hidden_size = int(config.hidden_size)
    num_layers = int(config.num_hidden_layers)
    _refuse_hyper_connections(model, config)
    if getattr(config, "zero_expert_num", None):  # LongCat-Flash: experts that return their input as it is
        raise HereticError(
            f"{type(model).__name__} routes tokens to identity experts that copy the MoE block's input into the residual "
            "stream; directional ablation of such layers is not supported."
        )
    if getattr(config, "full_attn_alpha_factor", None) is not None:  # DeepNorm-style: residual = norm(h) * alpha
        raise HereticError(
            f"{type(model).__name__} normalizes the residual stream itself in its layers (a post-norm residual); "
            "directional ablation of such layers is not supported."
        )
    layers_path, layers = find_layers(model, num_layers)
    mapping = ArchitectureMap(layers_path=layers_path, hidden_size=hidden_size)
    for index, layer in enumerate(layers):
        _refuse_residual_gates(model, layer)
        found, unknown = _layer_targets(layer, f"{layers_path}.{index}", hidden_size)
        if not any(found.values()):
            raise HereticError(
                f"Layer {index} of {type(model).__name__} has no recognizable output projection (looked for "
                "o_proj/out_proj/down_proj and fused expert tensors); this architecture is not supported yet."
            )
        mapping.layers.append(found)
        mapping.unrecognized += unknown
    if "attn" not in mapping.components:
        raise HereticError(
            f"No attention output projection was found in {type(model).__name__}; this architecture is not supported yet."
        )
    _refuse_shared_weights(model, mapping)
    return mapping


def _refuse_residual_gates(model: nn.Module, layer: nn.Module) -> None:
    """Layer children (by the end of their name) that transform a block's output or the residual stream channel by
    channel on its way into the stream (Ergo, Inkling): a write without the direction comes out with some of it,
    so there is no direction to remove from the blocks' output projections alone."""
    for name, _ in layer.named_children():
        what = next((what for end, what in RESIDUAL_TRANSFORMS.items() if name.endswith(end)), None)
        if what is not None:
            raise HereticError(f"{type(model).__name__} {what} ({name}); directional ablation of such layers is not supported.")


def _layer_targets(layer: nn.Module, path: str, hidden_size: int) -> tuple[dict[str, list[Target]], list[str]]:
    """(targets by component, unrecognized weights) of one layer; `path` is the layer's module path."""
    found: dict[str, list[Target]] = {name: [] for name in COMPONENTS}
    unknown: list[str] = []
    norms = post_norms(layer)
    for relative, module in layer.named_modules():
        if not relative:
            continue
        role = _role(relative)
        last = relative.rsplit(".", 1)[-1]
        out_features = getattr(module, "out_features", None)
        conv1d = type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)  # GPT-2: (in, out)
        if conv1d:
            out_features = module.nf
        is_output = last in OUTPUT_PROJECTIONS or _last_of_sequential(layer, relative)
        if out_features == hidden_size and is_output and role is not None:
            norm = norms.get(last if last in POST_NORMS else role)
            post_norm = f"{path}.{norm}" if norm else None
            found[role].append(Target(f"{path}.{relative}", out_axis=1 if conv1d else 0, post_norm=post_norm))
            continue
        if out_features == hidden_size and last not in INPUT_PROJECTIONS:
            unknown.append(f"{path}.{relative}")
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if parameter.dim() == 2 and parameter_name in FUSED_DOWN_PROJECTIONS and out_features is None:
                raise HereticError(
                    f"The experts' down projections {path}.{relative}.{parameter_name} are stacked in one 2-D tensor; "
                    "ablating experts stored that way is not supported."
                )
            if parameter.dim() != 3 or parameter_name in INPUT_PROJECTIONS or last in INPUT_PROJECTIONS:
                continue
            out_axis = _out_axis(module, parameter, hidden_size)
            stacked = parameter_name in FUSED_DOWN_PROJECTIONS or (parameter_name == "weight" and last in OUTPUT_PROJECTIONS)
            if stacked and parameter.shape[out_axis] == hidden_size:
                fused_role = ROLES.get(relative, "mlp")  # JetMoE's attention experts: "attn"
                norm = f"{path}.{norms[fused_role]}" if fused_role in norms else None
                target = Target(f"{path}.{relative}", parameter_name, fused=True, out_axis=out_axis, post_norm=norm)
                found[fused_role].append(target)
            elif hidden_size in parameter.shape[1:]:
                unknown.append(f"{path}.{relative}.{parameter_name}")
    return found, unknown


def _out_axis(module: nn.Module, parameter: torch.Tensor, hidden_size: int) -> int:
    """The axis of a fused (experts, ., .) tensor with the output: as the module says (`is_transposed`: stored
    (experts, in, out)), else the one axis of the hidden size (Llama 4 stores (experts, in, out) and says nothing)."""
    transposed = getattr(module, "is_transposed", None)
    if transposed is not None:
        return 2 if transposed else 1
    return 2 if parameter.shape[2] == hidden_size != parameter.shape[1] else 1


def _last_of_sequential(layer: nn.Module, relative: str) -> bool:
    """Whether the module is the last linear layer of an nn.Sequential block (CTRL's ffn.2)."""
    parent, _, last = relative.rpartition(".")
    container = layer.get_submodule(parent) if parent else layer
    if not last.isdigit() or not isinstance(container, nn.Sequential):
        return False
    linears = [name for name, child in container.named_children() if isinstance(child, nn.Linear)]
    return linears[-1:] == [last]


def post_norms(layer: nn.Module) -> dict[str, str]:
    """{component (or ROLES name): layer-relative name of the norm applied to its output before the residual add}."""
    by_last = {
        relative.rsplit(".", 1)[-1]: relative
        for relative, module in layer.named_modules()
        if relative and not isinstance(module, nn.Identity)  # a norm the config switched off
    }
    found: dict[str, str] = {}
    for role, names in POST_NORMS.items():
        for name in names:
            if name not in by_last:
                continue
            if name == "post_attention_layernorm" and not any(other in by_last for other in POST_FEEDFORWARD_NORMS):
                continue
            found.setdefault(role, by_last[name])
    return found


def _refuse_hyper_connections(model: nn.Module, config: Any) -> None:
    """Hyper-connections (Qwen4-Exp, HY V4, DeepSeek V4) and AltUp (Gemma 3n) keep several residual streams that
    the layers mix: a direction of the hidden size written out of each block does not remove it from the mixture."""
    names = ("hc_count", "hc_mult", "altup_num_inputs")
    streams = next((getattr(config, name) for name in names if isinstance(getattr(config, name, None), int)), 1)
    if streams > 1:
        raise HereticError(
            f"{type(model).__name__} keeps {streams} residual streams that its layers mix (hyper-connections or AltUp); "
            "ablating a direction from several residual streams is not supported."
        )


def _refuse_shared_weights(model: nn.Module, mapping: ArchitectureMap) -> None:
    """A weight reached from two layers (Zamba's shared transformer blocks) would get one ablation for
    both layers, whatever weights the kernel gives them: such models are refused."""
    owners: dict[int, int] = {}
    for index, _, target in mapping.targets():
        parameter = getattr(model.get_submodule(target.module), target.parameter)
        first = owners.setdefault(id(parameter), index)
        if first != index:
            raise HereticError(
                f"{type(model).__name__} shares the weight {target.name} between layers {first} and {index}; "
                "ablating weights shared by several layers is not supported."
            )


def _role(relative_path: str) -> str | None:
    if relative_path in ROLES:
        return ROLES[relative_path]
    parts = relative_path.lower().split(".")[:-1]
    joined = ".".join(parts)
    if any(hint in joined for hint in MLP_HINTS):
        return "mlp"
    if any(hint in joined for hint in ATTN_HINTS):
        return "attn"
    return None


def as_matrices(weight: torch.Tensor, target: Target, module: torch.nn.Module | None = None) -> torch.Tensor:
    """A target's stored weight as float32 matrices (experts, hidden, in); `module` is the weight's module
    (where bitsandbytes keeps an 8-bit weight's row scales once the model has run)."""
    if not target.fused:
        dense = _dequantized(weight, module).float()
        return (dense if target.out_axis == 0 else dense.T).unsqueeze(0)
    data = weight.detach().float()
    return data if target.out_axis == 1 else data.transpose(1, 2)


def _dequantized(weight: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor:
    """A bitsandbytes weight as the float matrix it stands for (other weights as they are).

    4-bit: bitsandbytes' own dequantization; 8-bit (LLM.int8): W = Q * s / 127, s the row scales (SCB),
    which the first forward pass moves from the weight to its module's state (`module.state.SCB`)."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnb_functional

        dense: torch.Tensor = bnb_functional.dequantize_4bit(weight.data, quant_state)
        return dense
    scales = getattr(weight, "SCB", None)
    for owner in (module, getattr(module, "base_layer", None)):  # the module, or the one an adapter wraps
        if scales is None:
            scales = getattr(getattr(owner, "state", None), "SCB", None)
    if weight.dtype == torch.int8 and scales is None:
        raise ValueError("an 8-bit weight without its row scales (SCB) cannot be dequantized")
    if scales is not None and weight.dtype == torch.int8:  # bitsandbytes 8-bit
        int8: torch.Tensor = weight.detach().float() * (scales.float().unsqueeze(1) / 127.0)
        return int8
    return weight.detach()
