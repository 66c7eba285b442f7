"""What kvtier reads from a vLLM engine's configuration: its KV cache, its sharding, its settings.

One vLLM engine may run as several processes: the scheduler in the EngineCore process and, with
the multiprocessing (or Ray) executor, one worker process per (pipeline stage, tensor rank). Each
worker holds one *shard* of the KV: its rank's heads of its stage's layers. kvtier names the
chunks of each shard apart (tensor rank, pipeline stage and layer range in the namespace), and the
scheduler, which sees only its own process, looks up every shard's keys so that a hit it promises
holds for every worker. Read at run time, never hard-coded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import vllm
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

from kvtier.chunk_format.dtypes import dtype_name
from kvtier.chunk_format.keys import KeyNamespace, ModelSettings
from kvtier.connector.engine_setup import CacheFormat, EngineSetup, Shard

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheShape:
    """What kvtier needs to know about this process's part of vLLM's KV cache."""

    layer_names: tuple[str, ...]
    block_size: int
    kv_heads: int
    head_size: int
    dtype: torch.dtype
    mla: bool
    opaque_backend: str | None  # set when the backend's in-block layout is private (CPU_ATTN)

    @property
    def per_block(self) -> bool:
        return self.opaque_backend is not None

    @property
    def format_id(self) -> str:
        if self.opaque_backend:
            return "opaque-blocks:" + self.opaque_backend
        return "mla" if self.mla else "kv"

    @classmethod
    def of(cls, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> CacheShape:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
            raise ValueError(f"kvtier supports models with one full-attention KV cache group; this one has "
                             f"{[type(g.kv_cache_spec).__name__ for g in groups]}")
        spec = groups[0].kv_cache_spec
        opaque = None
        if current_platform.is_cpu():  # CPU_ATTN keeps K transposed inside each block: store blocks whole
            cache_dtype = vllm_config.cache_config.cache_dtype
            opaque = f"CPU_ATTN/vllm-{vllm.__version__}/{dtype_name(spec.dtype)}/{cache_dtype}/bs{spec.block_size}"
        return cls(tuple(groups[0].layer_names), spec.block_size, spec.num_kv_heads, spec.head_size,
                   spec.dtype, isinstance(spec, MLAAttentionSpec), opaque)


def model_settings(vllm_config: VllmConfig) -> ModelSettings:
    """The engine options that change the KV besides the model's name (see :class:`ModelSettings`)."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    cache_dtype = str(cache.cache_dtype)
    overrides = getattr(model, "hf_overrides", None) or {}
    if callable(overrides):  # a function rewriting the HF config: name it, as its effect cannot be read back
        overrides = {"callable": f"{overrides.__module__}.{overrides.__qualname__}"}
    skip = list(getattr(cache, "kv_cache_dtype_skip_layers", None) or [])
    if skip:
        overrides = {**overrides, "kv_cache_dtype_skip_layers": skip}
    return ModelSettings(
        revision=model.revision, code_revision=getattr(model, "code_revision", None),
        quantization=str(model.quantization) if model.quantization else None, kv_cache_dtype=cache_dtype,
        model_dtype=None if cache_dtype == "auto" else dtype_name(model.dtype),
        kv_scales="calculated" if getattr(cache, "calculate_kv_scales", False) else "checkpoint",
        overrides=dict(overrides))


def layer_index(layer_name: str) -> int:
    """The model index of a layer from vLLM's layer name (``model.layers.7.self_attn.attn``)."""
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


@dataclass(frozen=True)
class EngineLayout:
    """How one vLLM engine is split over processes."""

    tp_size: int
    pp_size: int
    dp_local_rank: int
    workers_apart: bool  # workers run in processes of their own (not in the scheduler's process)
    total_layers: int

    @classmethod
    def of(cls, vllm_config: VllmConfig) -> EngineLayout:
        parallel = vllm_config.parallel_config
        backend = parallel.distributed_executor_backend
        if backend == "external_launcher" and parallel.world_size > 1:
            raise ValueError("kvtier does not support distributed_executor_backend='external_launcher' with "
                             f"world size {parallel.world_size}: each rank's scheduler would decide hits on its own, "
                             "and ranks that disagree would run different steps; use the default 'mp' executor")
        apart = backend not in (None, "uni", "external_launcher")
        dp_local = int(getattr(parallel, "data_parallel_rank_local", None) or 0)
        return cls(parallel.tensor_parallel_size, parallel.pipeline_parallel_size, dp_local, apart,
                   vllm_config.model_config.get_total_num_hidden_layers())

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def stage_layers(self, pp_rank: int, shape: CacheShape) -> range:
        """The model layers pipeline stage ``pp_rank`` holds: without stages every layer of the KV
        cache; with stages vLLM's own partition of the model's layers."""
        if self.pp_size == 1:
            return range(0, len(shape.layer_names))
        from vllm.distributed.utils import get_pp_indices

        start, end = get_pp_indices(self.total_layers, pp_rank, self.pp_size)
        return range(start, end)

    def metrics_offset(self, worker_rank: int | None) -> int:
        """Which of ``metrics.port + k`` this process serves, so an engine's processes never clash:
        k = 0 for the scheduler's process (with in-process workers: the only one), 1 + rank for each
        worker process; a data-parallel replica adds its local index times its process count."""
        per_engine = 1 + self.world_size if self.workers_apart else 1
        own = 0 if worker_rank is None or not self.workers_apart else 1 + worker_rank
        return self.dp_local_rank * per_engine + own


def namespace(setup: EngineSetup, shape: CacheShape, layout: EngineLayout, tp_rank: int, pp_rank: int,
              layers: range) -> KeyNamespace:
    """The key namespace of one shard (MLA: one namespace for all TP ranks, as on the SGLang side)."""
    cache = CacheFormat(kv_dtype="uint8" if shape.per_block else dtype_name(shape.dtype), layout=shape.format_id,
                        num_layers=len(layers), kv_heads=shape.kv_heads, head_dim=shape.head_size)
    shard = Shard(layout.tp_size, tp_rank, layout.pp_size, pp_rank, first_layer=layers.start)
    return setup.namespace(cache, shard)


def all_shards(setup: EngineSetup, shape: CacheShape, layout: EngineLayout) -> list[KeyNamespace]:
    """Every shard's namespace: what the scheduler looks up."""
    return [namespace(setup, shape, layout, tp, pp, layout.stage_layers(pp, shape))
            for pp in range(layout.pp_size) for tp in range(layout.tp_size)]


def worker_ranks() -> tuple[int, int]:
    """This worker's (tensor rank, pipeline stage); (0, 0) where vLLM's groups are not initialised."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank(), get_pp_group().rank_in_group
    except Exception:  # not initialised (single process)
        return 0, 0


def worker_layers(shape: CacheShape, layout: EngineLayout, pp_rank: int) -> range:
    """The layers this worker holds. With pipeline stages they are read from its own layer names
    and must be its stage's partition, or its keys would not be the ones the scheduler looks up
    (then: a clear error at start-up)."""
    expected = layout.stage_layers(pp_rank, shape)
    if layout.pp_size == 1:
        return expected
    indices = sorted(layer_index(name) for name in shape.layer_names)
    held = range(indices[0], indices[-1] + 1)
    if held != expected or len(indices) != len(held):
        raise ValueError(f"kvtier: pipeline stage {pp_rank} holds the KV of layers {indices[0]}-{indices[-1]} "
                         f"({len(indices)} layers) but vLLM's partition gives it {expected.start}-{expected.stop - 1}; "
                         "not supported")
    return expected
