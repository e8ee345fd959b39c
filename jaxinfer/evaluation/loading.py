"""Open a model for evaluation: anything ``--model`` accepts, plus a training run's Orbax checkpoints.

``resolve_model`` handles converted directories, GGUF files, Hugging Face directories and built-in
names. A training run is different: its Orbax directory holds one subdirectory per saved step
(``RUN/1000/``, ``RUN/2000/``; Orbax ``CheckpointManager`` layout), each with one or more items
(``params/``, ``state/``, ``default/``...), and no ``config.json`` or tokenizer of ours. Give it
with the model config (``--model-config``: a jaxinfer ``config.json`` or a Hugging Face one) and
a tokenizer (``--tokenizer``: a tokenizer directory, Hugging Face directory or GGUF file). The
weights are found in the stored tree wherever a subtree has exactly our weight names
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
    import orbax.checkpoint as ocp

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
    from jaxinfer.model.weights import flatten, weight_specs

    want = set(weight_specs(cfg))
    for item in items:
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.metadata(item).item_metadata.tree
        found = _find_weights(tree, want, flatten)
        if found is not None:
            prefix, suffix = found
            return TrainingCheckpoint(step_dir, item, step, prefix, suffix)
    raise ValueError(
        f"no subtree of {', '.join(str(i) for i in items)} has the weight names of {cfg.name} "
        f"(expected e.g. {', '.join(sorted(want)[:4])}...): is --model-config the config this run trained?"
    )


def _find_weights(tree: Any, want: set[str], flatten) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
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
        found = _find_weights(sub, want, flatten)
        if found is not None:
            return (str(key),) + found[0], found[1]
    return None


def restore_training_params(ckpt: TrainingCheckpoint, cfg, mesh, dtype: str) -> dict:
    """The weight subtree of a training checkpoint, nested as ``weights.nest``, sharded on ``mesh``."""
    import jax
    import orbax.checkpoint as ocp

    from jaxinfer.convert.names import host_dtype
    from jaxinfer.model.weights import nest, weight_specs
    from jaxinfer.sharding import weight_shardings

    np_dtype = host_dtype(dtype)
    shardings = weight_shardings(cfg, mesh)
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
    from jaxinfer.model.weights import flatten

    out = {}
    for name, value in flatten(tree).items():
        if ckpt.leaf_suffix:
            name = name[: -len("/".join(ckpt.leaf_suffix)) - 1]
        out[name] = value
    return nest(out)


def load_model_config(path: str | Path):
    """A jaxinfer ``config.json`` (ModelConfig) or a Hugging Face ``config.json``."""
    from jaxinfer.config import PRESETS, ModelConfig, from_hf_config

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
    from jaxinfer import tokenizer as tk

    p = Path(path).expanduser()
    if p.is_file():
        import gguf

        return tk.from_gguf(gguf.GGUFReader(str(p)))
    if (p / "tokenizer").is_dir():
        p = p / "tokenizer"
    return tk.load(p)


@dataclass(frozen=True)
class EngineSettings:
    slots: int = 8
    max_len: int = 2048
    prefill_buckets: tuple[int, ...] | None = None
    dtype: str | None = None
    mesh: str | None = None
    memory_budget_bytes: int | None = None  # sizes the KV cache (slots) from a budget instead


def open_engine(model: str, settings: EngineSettings, *, model_config: str | None = None, step: int | None = None,
                tokenizer: str | None = None):
    """(engine, checkpoint path, step): a converted/convertible model, or a training-run checkpoint
    when ``model_config`` is given."""
    import dataclasses

    from jaxinfer import sharding
    from jaxinfer.engine.engine import Engine, EngineConfig, enable_compilation_cache

    enable_compilation_cache()
    cfg = EngineConfig(slots=settings.slots, max_len=settings.max_len, lazy_compile=True,
                       memory_budget_bytes=settings.memory_budget_bytes)
    if settings.prefill_buckets:
        cfg = dataclasses.replace(cfg, prefill_buckets=tuple(settings.prefill_buckets))
    if model_config is not None or (is_training_run(model) and Path(model).exists()):
        if model_config is None:
            raise ValueError(f"{model} looks like a training run's Orbax checkpoint: give its --model-config")
        if tokenizer is None:
            raise ValueError("a training-run checkpoint carries no tokenizer: give --tokenizer")
        from jaxinfer.model.transformer import Transformer

        mcfg = load_model_config(model_config)
        mesh = sharding.make_mesh(settings.mesh)
        ckpt = find_training_checkpoint(model, mcfg, step)
        params = restore_training_params(ckpt, mcfg, mesh, settings.dtype or "float32")
        engine = Engine(Transformer(mcfg, params=params), cfg, mesh=mesh, tokenizer=load_tokenizer(tokenizer),
                        name=mcfg.name)
        log.info("restored step %s of %s (%s)", ckpt.step, model, ckpt.item_dir)
        return engine, ckpt.item_dir, ckpt.step
    if step is not None:
        raise ValueError("--step applies to a training run's checkpoint directory (with --model-config)")
    from jaxinfer.checkpoint import resolve_model

    path = resolve_model(model, dtype=settings.dtype or "float32")
    engine = Engine.from_checkpoint(path, mesh=settings.mesh, dtype=settings.dtype, config=cfg)
    if tokenizer is not None:
        engine.tokenizer = load_tokenizer(tokenizer)
    return engine, path, None


__all__ = [
    "EngineSettings",
    "open_engine",
    "find_training_checkpoint",
    "restore_training_params",
    "is_training_run",
    "load_model_config",
    "load_tokenizer",
]
