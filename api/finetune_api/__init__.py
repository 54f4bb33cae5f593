"""The FineTuneJob API: pydantic models, the single source of truth.

The CRD's ``openAPIV3Schema`` is generated from these models (``make crds``),
the operator parses resources with them and the trainer validates its job file
with them.  This package imports neither torch nor kopf.
"""

from finetune_api.v1alpha1 import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAME,
    VERSION,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    ManifestError,
    load_manifest,
    parse_manifest,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAME",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ManifestError",
    "load_manifest",
    "parse_manifest",
]
