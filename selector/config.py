"""A whole job's configuration: pydantic v2 models loaded from YAML.

* Unknown keys are rejected, with the path of the offending key (``corpus.text_colum``).
* Storage options' secrets (any key containing key/secret/token/password/credential) are
  redacted whenever the config is printed or written (:meth:`JobConfig.redacted`).
* :meth:`JobConfig.config_hash` ignores secrets and execution-only settings (``ray``,
  ``storage``, ``run_id``), so rotating a key or resizing the cluster does not invalidate finished work.

Stage sections (embedding, clustering, influence, ...) are defined next to their algorithm
and composed here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from selector.config_base import StrictModel
from selector.clusters.kmeans import ClusterConfig
from selector.data.corpus import CorpusConfig
from selector.clusters.embedding import EmbedConfig
from selector.gtp.pursuit import GTPConfig
from selector.gradients.influence import InfluenceConfig
from selector.quad.loop import QuadConfig
from selector.rho.excess_loss import RhoConfig
from selector.errors import ConfigError
from selector.data.workdir import stable_hash

REDACTED = "***redacted***"
_SECRET_KEY = re.compile(r"(key|secret|token|password|passwd|credential|session)", re.IGNORECASE)

METHODS = ("random", "quad", "topk-influence", "exploration-only", "perplexity", "rho", "gtp")
INFLUENCE_METHODS = ("quad", "topk-influence")
CLUSTER_METHODS = ("quad", "exploration-only")

# Execution-only settings inside stage sections: they change how, not what, is computed.
_EXECUTION_ONLY = {"embed": ("num_threads", "device"), "cluster": ("use_gpu", "assign_batch_size")}


class WorkConfig(StrictModel):
    """Where the job writes: ``<root>/runs/<run_id>/`` (work) and ``<root>/manifests/<run_id>/``."""

    root: str = Field(description="URI prefix the job owns (path, file://, s3://, gs://).")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for root.")


class BudgetConfig(StrictModel):
    """How many tokens to select: an absolute count or a fraction of the corpus's tokens."""

    tokens: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> "BudgetConfig":
        if (self.tokens is None) == (self.fraction is None):
            raise ValueError("give exactly one of budget.tokens or budget.fraction")
        return self

    def resolve(self, corpus_tokens: int) -> int:
        return self.tokens if self.tokens is not None else int(self.fraction * corpus_tokens)


class ReferenceConfig(CorpusConfig):
    """The reference set (high-quality / target-domain text) whose loss influence is measured on."""

    max_documents: int = Field(2000, ge=1, description="At most this many reference documents are used.")


class FactorFitConfig(StrictModel):
    """Which documents K-FAC factors are fitted on."""

    source: Literal["corpus", "reference"] = Field("corpus", description="A candidate-corpus sample (default) "
                                                   "or the reference set.")
    documents: int = Field(512, ge=1, description="Documents in the fitting sample.")


# A worker-pool size: an integer, or "auto" (resolved once per job by workers.runtime.resolve_workers).
WorkerCount = Annotated[int, Field(ge=1)] | Literal["auto"]


class RayConfig(StrictModel):
    """Execution only (not part of the config hash)."""

    address: str | None = Field(None, description="Ray address; default: RAY_ADDRESS, else start a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs for a local Ray (oversubscribe: 2 x cores).")
    shard_readers: int = Field(2, ge=1, description="Index tasks at once (Ray Data), and the least number of "
                               "task groups the reads over the index are split into.")
    reader_num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per index task (fractional avoids starving).")
    embed_workers: WorkerCount = Field("auto", description="Encoder actors (one GPU each when the cluster has GPUs); "
                                       "auto: one per GPU, else one per CPU core within memory (workers.runtime).")
    influence_workers: WorkerCount = Field("auto", description="Influence (and GTP feature) actors; auto as embed_workers.")
    loss_workers: WorkerCount = Field("auto", description="Loss-scoring actors (perplexity, rho, token masks); auto as "
                                      "embed_workers; rho.num_workers, when set, wins.")
    worker_num_cpus: float = Field(0.5, gt=0, description="CPUs per model actor on a CPU-only cluster.")


class StorageConfig(StrictModel):
    """Execution only (not part of the config hash): how long to retry an object store that fails."""

    retry_seconds: float = Field(30.0, ge=0, description="A store that does not answer (refused, unreachable, "
                                 "timed out) is retried with backoff for at most this long, then the job stops "
                                 "with an error naming the URI.")


class JobConfig(StrictModel):
    """One selection job."""

    run_id: str | None = Field(None, description="Default: <method>-<config hash>; same config resumes the same run.")
    method: Literal[METHODS] = "random"  # type: ignore[valid-type]
    seed: int = 0
    tokenizer: str = Field(description="Path/URI of the trainer's HF tokenizer; budgets are counted in its tokens.")
    corpus: CorpusConfig
    work: WorkConfig
    budget: BudgetConfig
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    proxy_model: str | None = Field(None, description="Causal LM whose gradients define influence (quad, "
                                    "topk-influence): the training checkpoint or a small proxy of it.")
    reference: ReferenceConfig | None = Field(None, description="Reference set for influence (quad, topk-influence).")
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    influence: InfluenceConfig = Field(default_factory=InfluenceConfig)
    factors: FactorFitConfig = Field(default_factory=FactorFitConfig)
    quad: QuadConfig = Field(default_factory=QuadConfig)
    rho: RhoConfig | None = Field(None, description="Reference and training models for perplexity, rho and masks.")
    mask_tokens: bool = Field(False, description="Add Rho-1 token masks (top rho.keep_ratio of excess loss) to "
                              "the selection of any method.")
    gtp: GTPConfig | None = Field(None, description="Checkpoints and pursuit settings for method gtp.")

    @model_validator(mode="after")
    def _method_needs(self) -> "JobConfig":
        if self.method in INFLUENCE_METHODS:
            missing = [k for k in ("proxy_model", "reference") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"method {self.method!r} needs {' and '.join(missing)}")
        if (self.method in ("perplexity", "rho") or self.mask_tokens) and self.rho is None:
            raise ValueError(f"method {self.method!r}{' with mask_tokens' if self.mask_tokens else ''} needs a rho "
                             "section (reference_model, training_model)")
        if self.method == "gtp":
            if self.gtp is None:
                raise ValueError("method 'gtp' needs a gtp section (checkpoints: at least two model paths)")
            if self.gtp.target == "reference" and self.reference is None:
                raise ValueError("gtp.target 'reference' needs a reference section")
        if self.factors.source == "reference" and self.reference is None:
            raise ValueError("factors.source 'reference' needs a reference section")
        if self.method == "quad" and self.quad.propagate and self.quad.neighbour_radius > self.cluster.neighbour_radius:
            raise ValueError(f"quad.neighbour_radius ({self.quad.neighbour_radius}) exceeds "
                             f"cluster.neighbour_radius ({self.cluster.neighbour_radius}): the clustering stage "
                             "would not list the neighbours the bandit needs")
        return self

    # -- identity ------------------------------------------------------------------------
    def hashable(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"ray", "run_id", "storage"})
        for section, keys in _EXECUTION_ONLY.items():
            for key in keys:
                data.get(section, {}).pop(key, None)
        return _strip_secrets(data)

    def config_hash(self) -> str:
        return stable_hash(self.hashable())

    def resolved_run_id(self) -> str:
        return self.run_id or f"{self.method}-{self.config_hash()[:12]}"

    def redacted(self) -> dict[str, Any]:
        return _redact(self.model_dump(mode="json"))

    def stage_hash(self, *sections: str, extra: Any = None) -> str:
        """Hash of the sections a stage depends on (so unrelated edits don't redo it)."""
        data = self.hashable()
        return stable_hash({s: data.get(s) for s in sections} | {"_extra": extra})


def _is_secret(key: str) -> bool:
    return bool(_SECRET_KEY.search(key)) and key not in ("key_prefix",)


def _redact(obj: Any, in_storage: bool = False) -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            inside = in_storage or k == "storage_options"
            if inside and _is_secret(k) and not isinstance(v, (dict, list)):
                out[k] = REDACTED
            else:
                out[k] = _redact(v, inside)
        return out
    if isinstance(obj, list):
        return [_redact(v, in_storage) for v in obj]
    return obj


def _strip_secrets(obj: Any, in_storage: bool = False) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_secrets(v, in_storage or k == "storage_options") for k, v in obj.items()
                if not ((in_storage or k == "storage_options") and _is_secret(k) and not isinstance(v, (dict, list)))}
    if isinstance(obj, list):
        return [_strip_secrets(v, in_storage) for v in obj]
    return obj


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"  {path}: required key missing")
        else:
            lines.append(f"  {path}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<dict>") -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of a config file, or a :class:`ConfigError` naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Load a YAML job config; ``overrides`` are merged on top (dotted keys allowed)."""
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        cursor = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            cursor = cursor.setdefault(p, {})
        cursor[leaf] = value
    return parse_config(data, str(path))


def dump_yaml(config: JobConfig) -> str:
    """The config as YAML with secrets redacted (safe to print or store)."""
    return yaml.safe_dump(config.redacted(), sort_keys=False)
