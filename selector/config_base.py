"""The base of every configuration model: strict pydantic v2 with named, helpful errors.

Stage modules define their own config section on top of :class:`StrictModel`; the whole
job's model (``selector.config.JobConfig``) composes them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Rejects unknown keys (so a typo in YAML is an error, not a silently ignored field)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
