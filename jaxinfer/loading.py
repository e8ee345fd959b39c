"""One way to turn a model argument into an :class:`~jaxinfer.engine.engine.Engine`.

:func:`resolve` finds the weights for what ``--model`` names: a converted checkpoint directory,
a GGUF file, a Hugging Face directory or a built-in name (the last three converted once into
the cache; :func:`jaxinfer.checkpoint.resolve_model`), or a training run's Orbax checkpoints.
:func:`build_engine` restores them onto a mesh and builds the engine. Every front end (the CLI,
:func:`jaxinfer.load`, evaluation, the lm-eval backend) goes through these two.

A training run is different from a converted model: its Orbax directory holds one subdirectory
per saved step (``RUN/1000/``, ``RUN/2000/``; Orbax ``CheckpointManager`` layout), each with one
or more items (``params/``, ``state/``, ``default/``...), and no ``config.json`` or tokenizer of
ours. Give it with the model config (``model_config``: a jaxinfer ``config.json``, a Hugging Face
one or a preset name) and a tokenizer (a tokenizer directory, Hugging Face directory or GGUF
file). The weights are found in the stored tree wherever a subtree has exactly our weight names
(``embed``, ``layers/wq``, ...; :func:`jaxinfer.model.weights.weight_specs`), e.g. the whole tree,
``params``, or ``model`` of a train state next to its optimizer state; Flax NNX ``{"value": x}``
leaves are accepted. Only that subtree is read, straight into the sharded layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxinfer import sharding
from jaxinfer import tokenizer as tk
from jaxinfer.checkpoint import load_checkpoint, resolve_model
from jaxinfer.config import PRESETS, ModelConfig, from_hf_config
from jaxinfer.convert.names import host_dtype
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.model.transformer import Transformer
from jaxinfer.model.weights import flatten, nest, weight_specs

DEFAULT_MODEL = "smollm2-135m-instruct"

log = logging.getLogger(__name__)

ITEM_NAMES = ("params", "state", "default", "model", "train_state")


@dataclass(frozen=True)
class TrainingCheckpoint:
    step_dir: Path
    item_dir: Path
    step: int | None
    prefix: tuple[str, ...]  # path of the weight subtree inside the stored tree
    leaf_suffix: tuple[str, ...]  # ("value",) for NNX variable-state leaves, else ()


def _is_orbax_item(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt"))


def _steps(run: Path) -> dict[int, Path]:
    return {int(p.name): p for p in run.iterdir() if p.is_dir() and p.name.isdigit()} if run.is_dir() else {}


def is_training_run(path: str | Path) -> bool:
    """A directory of numbered step checkpoints, or one step's / one item's Orbax directory."""
    p = Path(path)
    if (p / "jaxinfer.json").is_file():
        return False
    return bool(_steps(p)) or _is_orbax_item(p) or any(_is_orbax_item(p / n) for n in ITEM_NAMES)


def find_training_checkpoint(path: str | Path, cfg, step: int | None = None) -> TrainingCheckpoint:
    """Locate the step (``step`` or the latest), its item and the weight subtree for ``cfg``."""
    p = Path(path).expanduser().absolute()
    steps = _steps(p)
    if steps:
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"{p} has no step {step} (steps: {', '.join(str(s) for s in sorted(steps))})")
        step_dir = steps[step]
    else:
        if step is not None:
            raise ValueError(f"{p} is a single checkpoint, not a run with numbered steps: drop --step")
        step_dir = p
        if p.name.isdigit():
            step = int(p.name)
        elif p.parent.name.isdigit() and _is_orbax_item(p):
            step = int(p.parent.name)
    items = [step_dir / n for n in ITEM_NAMES if _is_orbax_item(step_dir / n)]
    items += sorted(d for d in step_dir.iterdir() if _is_orbax_item(d) and d not in items) if step_dir.is_dir() else []
    if _is_orbax_item(step_dir) and not items:
        items = [step_dir]
    if not items:
        raise ValueError(f"{step_dir} holds no Orbax checkpoint item")
    want = set(weight_specs(cfg))
    for item in items:
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.metadata(item).item_metadata.tree
        found = _find_weights(tree, want)
        if found is not None:
            prefix, suffix = found
            return TrainingCheckpoint(step_dir, item, step, prefix, suffix)
    raise ValueError(
        f"no subtree of {', '.join(str(i) for i in items)} has the weight names of {cfg.name} "
        f"(expected e.g. {', '.join(sorted(want)[:4])}...): is --model-config the config this run trained?"
    )


def _find_weights(tree: Any, want: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    if not isinstance(tree, dict):
        return None
    names = set(flatten(dict(tree)))
    for suffix in ((), ("value",)):
        strip = "/" + "/".join(suffix) if suffix else ""
        if {n[: len(n) - len(strip)] if strip and n.endswith(strip) else n for n in names} == want and (
            not suffix or all(n.endswith(strip) for n in names)
        ):
            return (), suffix
    for key, sub in tree.items():
        found = _find_weights(sub, want)
        if found is not None:
            return (str(key),) + found[0], found[1]
    return None


def restore_training_params(ckpt: TrainingCheckpoint, cfg, mesh, dtype: str) -> dict:
    """The weight subtree of a training checkpoint, nested as ``weights.nest``, sharded on ``mesh``."""
    np_dtype = host_dtype(dtype)
    shardings = sharding.weight_shardings(cfg, mesh)
    flat = {}
    for name, spec in weight_specs(cfg).items():
        flat["/".join(ckpt.prefix + (name,) + ckpt.leaf_suffix)] = jax.ShapeDtypeStruct(
            spec.shape, np_dtype, sharding=shardings[name]
        )
    target = nest(flat)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.restore(ckpt.item_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                        partial_restore=True))
    for key in ckpt.prefix:
        tree = tree[key]
    out = {}
    for name, value in flatten(tree).items():
        if ckpt.leaf_suffix:
            name = name[: -len("/".join(ckpt.leaf_suffix)) - 1]
        out[name] = value
    return nest(out)


def load_model_config(path: str | Path):
    """A jaxinfer ``config.json`` (ModelConfig) or a Hugging Face ``config.json``."""
    if str(path) in PRESETS and not Path(path).exists():
        return PRESETS[str(path)]
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    d = json.loads(p.read_text())
    if "model_type" in d or "architectures" in d:
        return from_hf_config(d, name=p.parent.name)
    return ModelConfig.from_json(p.read_text())


def load_tokenizer(path: str | Path):
    """A tokenizer from a tokenizer / Hugging Face / converted checkpoint directory or a GGUF file."""
    p = Path(path).expanduser()
    if p.is_file():
        return tk.from_gguf(gguf.GGUFReader(str(p)))
    if (p / "tokenizer").is_dir():
        p = p / "tokenizer"
    return tk.load(p)


@dataclass(frozen=True)
class ModelSource:
    """Where an engine's weights come from."""

    model: str  # what the caller named: a path or a built-in name
    path: Path  # the converted checkpoint directory, or the training checkpoint's item directory
    step: int | None = None  # training step of a training-run checkpoint
    training: TrainingCheckpoint | None = None
    config: ModelConfig | None = None  # the model config of a training run (a converted one carries its own)


def resolve(model: str | Path, *, dtype: str | None = None, model_config: str | Path | None = None,
            step: int | None = None) -> ModelSource:
    """Find (converting on first use) the weights ``model`` names; a training run's Orbax directory
    needs ``model_config``. ``dtype`` is the dtype a conversion writes (default float32)."""
    model = str(model)
    if model_config is not None or (is_training_run(model) and Path(model).exists()):
        if model_config is None:
            raise ValueError(f"{model} looks like a training run's Orbax checkpoint: give its model config "
                             "(--model-config)")
        cfg = load_model_config(model_config)
        ckpt = find_training_checkpoint(model, cfg, step)
        return ModelSource(model, ckpt.item_dir, ckpt.step, ckpt, cfg)
    if step is not None:
        raise ValueError("step applies to a training run's checkpoint directory (with a model config)")
    return ModelSource(model, resolve_model(model, dtype=dtype or "float32"))


def build_engine(model: str | Path | ModelSource = DEFAULT_MODEL, config: EngineConfig | None = None, *,
                 mesh: Mesh | str | None = None, dtype: str | None = None,
                 tokenizer: str | Path | tk.Tokenizer | None = None) -> Engine:
    """The engine for ``model`` (anything :func:`resolve` takes, or what it returned) on ``mesh``
    (a Mesh or ``"data=D,model=M"``; default one device). ``dtype``: the dtype the weights are
    restored in (default: the checkpoint's); ``tokenizer`` replaces the checkpoint's (a training
    run has none of its own)."""
    source = model if isinstance(model, ModelSource) else resolve(model, dtype=dtype)
    if not isinstance(mesh, Mesh):
        mesh = sharding.make_mesh(mesh)
    config = config or EngineConfig()
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if source.training is not None:
        if tok is None:
            raise ValueError("a training-run checkpoint carries no tokenizer: give one (--tokenizer)")
        params = restore_training_params(source.training, source.config, mesh, dtype or "float32")
        log.info("restored step %s of %s (%s)", source.step, source.model, source.path)
        return Engine(Transformer(source.config, params=params), config, mesh=mesh, tokenizer=tok,
                      name=source.config.name)
    ckpt = load_checkpoint(source.path, mesh=mesh, dtype=dtype)
    return Engine(Transformer(ckpt.config, params=ckpt.params), config, mesh=mesh,
                  tokenizer=tok if tok is not None else ckpt.tokenizer, name=ckpt.config.name)


__all__ = [
    "DEFAULT_MODEL",
    "ModelSource",
    "resolve",
    "build_engine",
    "find_training_checkpoint",
    "restore_training_params",
    "is_training_run",
    "load_model_config",
    "load_tokenizer",
]
