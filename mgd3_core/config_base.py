"""What every config section shares: strict, frozen pydantic models; the memory budget default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Memory for one batch's activations in student training, evaluation and feature
# extraction (MiB); batch sizes follow from it and the image size (mgd3_core.batching).
DEFAULT_MEMORY_BUDGET_MB = 2048


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
