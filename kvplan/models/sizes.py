"""A config's sizes checked against the tensors a checkpoint holds, from the files' headers only.

A config.json that promises more layers, or larger ones, than the checkpoint's tensors hold is
refused here, when the source is opened: before anything of the promised size is built or
allocated (a config of a million layers once spent minutes and gigabytes building modules for
layers that did not exist, and a hidden size of 1e9 allocated activations before the first weight
was compared). Only tensor names and shapes are read, never tensor data; one layer's shapes are
computed, on the meta device, and every other layer's names follow from them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from kvplan import stack
from kvplan.config import DecoderConfig
from kvplan.lazy import lazy_import
from kvplan.models.base import ConfigOrigin, ModelError
from kvplan.models.families.registry import Family
from kvplan.stack import StackSpec

torch = lazy_import("torch")

_Q, _KV = ("num_heads", "head_dim"), ("num_kv_heads", "head_dim")
_H, _I, _D = ("hidden_size",), ("intermediate_size",), ("head_dim",)
# The DecoderConfig sizes each axis of a layer's tensors is made of, by kvplan's name after
# ``layers.{i}.``; every other tensor is a norm gain over the hidden size.
AXES = {
    "self_attn.q_proj.weight": (_Q, _H), "self_attn.q_proj.bias": (_Q,),
    "self_attn.k_proj.weight": (_KV, _H), "self_attn.k_proj.bias": (_KV,),
    "self_attn.v_proj.weight": (_KV, _H), "self_attn.v_proj.bias": (_KV,),
    "self_attn.o_proj.weight": (_H, _Q), "self_attn.o_proj.bias": (_H,),
    "mlp.gate_proj.weight": (_I, _H), "mlp.gate_proj.bias": (_I,),
    "mlp.up_proj.weight": (_I, _H), "mlp.up_proj.bias": (_I,),
    "mlp.down_proj.weight": (_H, _I), "mlp.down_proj.bias": (_H,),
    "self_attn.q_norm.weight": (_D,), "self_attn.k_norm.weight": (_D,),
}
FIRST = "layers.0."


class Held(NamedTuple):
    """What a checkpoint holds under one of its tensor names: ``file`` and ``name`` as a user finds
    them, the ``shape`` stored (None: no such tensor) and the ``expected`` shape in that storage."""
    file: str
    name: str
    shape: tuple[int, ...] | None
    expected: tuple[int, ...]
    # The shapes are a packed int4 linear's [out, in], unpacked from its qweight's.
    packed: bool = False
    # Said after the name: what else the tensor is known as.
    also: str = ""


def _axes(name: str) -> tuple[tuple[str, ...], ...]:
    return AXES.get(name.split(".", 2)[2] if name.startswith("layers.") else name, (_H,))


def layer_template(cfg: DecoderConfig, family) -> tuple[dict[str, tuple[int, ...]], dict[str, list[set[str]]]]:
    """Layer 0's and the final norm's tensors in the checkpoint's names: their shapes, and for each
    axis the DecoderConfig sizes it is made of (a fused projection's axis, of all its parts')."""
    ours = stack.tensor_shapes(cfg, StackSpec(0, 1, True))
    if type(family).to_checkpoint is Family.to_checkpoint:
        shapes = dict(ours)         # the checkpoint holds kvplan's tensors as they are
    else:                           # a family that fuses or transforms them: the mapping on meta tensors
        with torch.device("meta"):
            metas = {n: torch.empty(shape) for n, shape in ours.items()}
        shapes = {n: tuple(t.shape) for n, t in family.to_checkpoint(cfg, metas).items()}
    fields: dict[str, list[set[str]]] = {}
    for name in ours:
        axes = fields.setdefault(family.checkpoint_name(cfg, name), [])
        for i, sizes in enumerate(_axes(name)):
            if i == len(axes):
                axes.append(set())
            axes[i].update(sizes)
    return shapes, fields


def check(cfg: DecoderConfig, family, origin: ConfigOrigin,
          lookup: Callable[[str, tuple[int, ...]], Held]) -> None:
    """Refuse a config whose layers or sizes the checkpoint does not hold.

    ``lookup(name, expected)``: what the checkpoint holds for its tensor ``name`` (no ``model.``
    prefix), which kvplan expects in ``expected`` shape (the checkpoint's layout). The layers are
    walked in order and the walk stops at the first layer the checkpoint lacks entirely, so a
    config of a million layers over a checkpoint of four costs four layers' look-ups.
    """
    shapes, fields = layer_template(cfg, family)
    layer = [n.removeprefix(FIRST) for n in shapes if n.startswith(FIRST)]
    for i in range(cfg.num_layers):
        held = [(n, lookup(f"layers.{i}.{n}", shapes[FIRST + n])) for n in layer]
        absent = [h for _, h in held if h.shape is None]
        if i and len(absent) == len(held):
            first = absent[0]
            raise ModelError(f"{first.file}: tensor {first.name!r}{first.also} is missing: "
                             f"{origin.named('num_layers')} = {cfg.num_layers}, but the checkpoint holds "
                             f"{i} layer{'s' * (i != 1)}")
        for n, h in held:
            _compare(cfg, origin, h, fields[FIRST + n])
    for n in shapes:
        if not n.startswith("layers."):
            _compare(cfg, origin, lookup(n, shapes[n]), fields[n])


def _compare(cfg: DecoderConfig, origin: ConfigOrigin, held: Held, fields: list[set[str]]) -> None:
    if held.shape is None:
        raise ModelError(f"{held.file}: tensor {held.name!r}{held.also} is missing from the checkpoint")
    if held.shape == held.expected:
        return
    if len(held.shape) == len(held.expected):
        wrong = [fields[i] for i, (a, b) in enumerate(zip(held.shape, held.expected)) if a != b]
    else:
        wrong = fields
    names = [f for f in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")
             if any(f in axis for axis in wrong)]
    said = ", ".join(f"{origin.field(f)} = {getattr(cfg, f)}" for f in names)
    holds = f"packs a {list(held.shape)} linear" if held.packed else f"has shape {list(held.shape)}"
    raise ModelError(f"{held.file}: tensor {held.name!r}{held.also} {holds}, but {origin.file}'s "
                     f"{said} need{'s' * (len(names) == 1)} {list(held.expected)}")
