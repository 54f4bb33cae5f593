"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

pydantic writes JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI
v3.0 schema: every node typed, no ``$ref``, no ``anyOf`` over types, boolean
``exclusiveMinimum``, ``nullable`` instead of ``type: null``.  ``structural``
rewrites one into the other; ``build_crd`` wraps it in the CRD.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from finetune_api.v1alpha1 import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAME,
    SINGULAR,
    VERSION,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

CRD_FILE = Path("crds") / f"{PLURAL}.{GROUP}.yaml"
# On everything generated into crds/ (the CRD and the immutability policy).
LABELS = {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune"}
HEADER = "# Generated from api/finetune_api/v1alpha1.py by `make crds`. Do not edit.\n"

# Keywords Kubernetes' structural schemas know; pydantic's others (title, ...) are dropped.
_KEEP = {
    "type",
    "format",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "nullable",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every ``$ref`` (the models have no recursion)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve(merged, defs)
        return {k: _resolve(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def structural(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one resolved pydantic schema node into a structural OpenAPI v3.0 node."""
    node = dict(node)
    # Optional[X] is anyOf [X, null]: keep X.  The CRD omits null values (pruned
    # before defaulting), which is what "unset" means here.
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express anyOf {branches} structurally")
        outer = {k: v for k, v in node.items() if k not in ("default",) or v is not None}
        node = {**branches[0], **outer}
        if node.get("default", "absent") is None:
            node.pop("default")
    if "allOf" in node:
        parts = node.pop("allOf")
        for part in parts:
            node = {**part, **node}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            node["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            node[bound] = True
    if node.get("type") == "integer" and "multipleOf" in node:
        node["multipleOf"] = int(node["multipleOf"])
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value
        elif key not in _KEEP:
            continue
        elif key == "properties":
            out[key] = {name: structural(child) for name, child in value.items()}
        elif key == "items":
            out[key] = structural(value)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = structural(value)
            elif value is True and "x-kubernetes-preserve-unknown-fields" not in node:
                out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" in out and isinstance(out.get("default"), dict):
        # An object field with a default of its own: "{}" lets the apiserver
        # apply the nested defaults (it defaults only inside present objects).
        out["default"] = {}
    if "default" in out and out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("default")
    if out.get("type") == "array" and out.get("default") == []:
        out.pop("default")
    if out.get("type") == "object" and out.get("default") == {} and "properties" not in out:
        out.pop("default")
    if "description" in out:
        out["description"] = " ".join(out["description"].split())
    return out


def schema_of(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(_resolve(raw, raw.get("$defs", {})))


def build_crd() -> dict[str, Any]:
    spec_schema = schema_of(FineTuneJobSpec)
    status_schema = schema_of(FineTuneJobStatus)
    status_schema["description"] = "What the operator observed; written only by the operator."
    spec_schema["description"] = (
        "What to train, on what, and where the result goes. The model, dataset and method cannot change once "
        "created; what the Job is made from (training, output, resources, ...) cannot change once the Job exists."
    )
    printer_columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {
            "name": "Progress",
            "type": "string",
            "jsonPath": ".status.progressText",
            "description": "Step / total steps and percent.",
        },
        {"name": "ETA", "type": "string", "jsonPath": ".status.etaText", "description": "Time left."},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "format": "float"},
        # Why the job is where it is, without -o wide: a Failed job's reason, a Queued job's
        # reason and LocalQueue (the message is in kubectl describe).
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "description": "Why it is in this phase."},
        {"name": "Queue", "type": "string", "jsonPath": ".status.queue.name", "description": "Its Kueue LocalQueue."},
        {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "priority": 1},
        {
            "name": "Estimate",
            "type": "string",
            "jsonPath": ".status.estimate.durationText",
            "description": "Expected running time, from finished jobs of the same kind.",
            "priority": 1,
        },
        {
            "name": "GPU-Seconds",
            "type": "number",
            "jsonPath": ".status.usage.gpuSeconds",
            "description": "GPUs x running time over every attempt.",
            "priority": 1,
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": dict(LABELS),
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                # Not "all": kubectl's convention keeps `kubectl get all` to built-in workloads.
                "categories": ["ml"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "A Stable Diffusion fine-tuning run (DreamBooth or LoRA) on the cluster's GPUs."
                            ),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def generate(text: str, args: list[str], default: Path) -> int:
    """Write ``text`` to each path of ``args``, or with ``--check [path]`` fail when that file
    differs from it, or print it."""
    if args and args[0] == "--check":
        target = Path(args[1]) if len(args) > 1 else default
        if not target.is_file() or target.read_text() != text:
            print(f"{target} is stale: run `make crds` and commit the result", file=sys.stderr)
            return 1
        return 0
    if args:
        for target in map(Path, args):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        return 0
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return generate(render_crd(), argv if argv is not None else sys.argv[1:], CRD_FILE)


if __name__ == "__main__":
    sys.exit(main())
