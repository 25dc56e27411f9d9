"""The TVM backend: ``lower`` (torch.export → Relax → build → VM), ``schedules`` (the default CPU/GPU schedules)
and ``tuning`` (MetaSchedule over a per-target database). The backend reads the tuning database and tuning
measures the default schedules; neither imports the other's caller."""
from .lower import TvmArtifact, TvmBackend, build, prepare, relax_module, tvm_target
from .schedules import default_schedule, schedule

__all__ = ["TvmArtifact", "TvmBackend", "build", "default_schedule", "prepare", "relax_module", "schedule",
           "tvm_target"]
