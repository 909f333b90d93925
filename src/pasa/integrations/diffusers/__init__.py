"""PASA for diffusers pipelines: ``apply``, ``remove``, ``last_report``.

See ``docs/diffusers.md`` for the supported models and how each is handled.
"""

from pasa.integrations.diffusers.api import apply, last_report, remove
from pasa.integrations.diffusers.families import supported_names
from pasa.integrations.diffusers.hook import RunState
from pasa.integrations.diffusers.report import GenerationReport, StepReport

__all__ = [
    "GenerationReport",
    "RunState",
    "StepReport",
    "apply",
    "last_report",
    "remove",
    "supported_names",
]
