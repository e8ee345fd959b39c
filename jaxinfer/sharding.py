"""The only place sharding is decided: logical axis names -> mesh axes.

Models and the KV cache name their dimensions with logical axes (``vocab``,
``heads``, ``slots`` ...). :data:`LOGICAL_RULES` maps each to a mesh axis of a
``("data", "model")`` mesh. A dimension whose size the mesh axis does not divide
falls back to replication (SmolLM2's 9 heads on 4 model shards, say), unless
``strict=True``; every fallback is reported so operators see it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.model.weights import weight_specs

log = logging.getLogger(__name__)

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (None: replicated)
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "model",
    "embed": None,
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "layers": None,
    "norm": None,
    "slots": "data",
    "batch": "data",
    "seq": None,
}


def _check_rules(rules: dict[str, str | None]) -> None:
    for name, axis in rules.items():
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"logical axis {name!r} maps to unknown mesh axis {axis!r} (mesh axes: {MESH_AXES})")


_check_rules(LOGICAL_RULES)


@dataclass(frozen=True)
class MeshShape:
    data: int = 1
    model: int = 1

    @property
    def size(self) -> int:
        return self.data * self.model

    @classmethod
    def parse(cls, text: str | None) -> "MeshShape":
        """Parse ``"data=2,model=4"`` (either part optional; empty = 1x1)."""
        if not text:
            return cls()
        sizes: dict[str, int] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in MESH_AXES:
                raise ValueError(f"bad mesh spec {text!r}: expected e.g. 'data=2,model=4' with axes {MESH_AXES}")
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"bad mesh spec {text!r}: {key} size {value!r} is not an integer") from None
            if n < 1:
                raise ValueError(f"bad mesh spec {text!r}: {key} size must be >= 1")
            sizes[key] = n
        return cls(**sizes)

    def __str__(self) -> str:
        return f"data={self.data},model={self.model}"


def make_mesh(shape: MeshShape | str | None = None, devices: list | None = None) -> Mesh:
    """A ``("data", "model")`` mesh over the first ``shape.size`` devices."""
    if not isinstance(shape, MeshShape):
        shape = MeshShape.parse(shape)
    devices = list(devices if devices is not None else jax.devices())
    if shape.size > len(devices):
        raise ValueError(
            f"mesh {shape} needs {shape.size} devices but only {len(devices)} are visible "
            f"({devices[0].platform}); set --mesh to use at most {len(devices)}"
        )
    arr = np.array(devices[: shape.size]).reshape(shape.data, shape.model)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def partition_spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, *, strict: bool = False, what: str = ""
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes on this mesh."""
    used: set[str] = set()
    spec: list[str | None] = []
    for name, size in zip(axes, shape):
        axis = LOGICAL_RULES.get(name) if name else None
        if axis is None or mesh.shape[axis] == 1:
            spec.append(None)
            continue
        if axis in used:
            raise ValueError(f"{what}: mesh axis {axis!r} used twice in {axes}")
        if size % mesh.shape[axis]:
            msg = f"{what}: {name}={size} is not divisible by mesh axis {axis}={mesh.shape[axis]}"
            if strict:
                raise ValueError(msg + " (strict sharding: choose a mesh whose model size divides it)")
            log.info("%s; replicating that dimension", msg)
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    return PartitionSpec(*spec)


def named_sharding(axes, shape, mesh: Mesh, *, strict: bool = False, what: str = "") -> NamedSharding:
    return NamedSharding(mesh, partition_spec(tuple(axes), tuple(shape), mesh, strict=strict, what=what))


def weight_shardings(cfg, mesh: Mesh, *, strict: bool = False, quant: str | None = None) -> dict[str, NamedSharding]:
    """Flat ``{weight name: NamedSharding}`` from the weight declarations (``quant``: of that format)."""
    return {
        name: named_sharding(spec.axes, spec.shape, mesh, strict=strict, what=name)
        for name, spec in weight_specs(cfg, quant).items()
    }


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
    return f"{dict(mesh.shape)} over {math.prod(mesh.devices.shape)} {mesh.devices.flat[0].platform} device(s)"
