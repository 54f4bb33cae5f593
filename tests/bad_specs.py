"""Bad FineTuneJob specs, shared by the model tests and the apiserver tests.

Each case: an id, a change to a good spec, and the field path the error must name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_api.rules import Rule


def good_manifest(name: str = "good") -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "pvc://models/sd15", "type": "v1x"},
            "dataset": {"instanceImages": "pvc://datasets/nick/", "instancePrompt": "a photo of sks"},
            "training": {"stepsPerImage": 10},
            "output": {"uri": "pvc://outputs/nick/"},
        },
    }


@dataclass(frozen=True)
class BadSpec:
    id: str
    change: Callable[[dict[str, Any]], None]
    field: str  # the path the error message must name


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        node = manifest["spec"]
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    return change


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        node = manifest["spec"]
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        del node[leaf]

    return change


def _both(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        for one in changes:
            one(manifest)

    return change


BAD_SPECS = [
    # enums
    BadSpec("method-unknown", _set("method", "Textual"), "spec.method"),
    BadSpec("model-type-unknown", _set("baseModel.type", "v3"), "spec.baseModel.type"),
    BadSpec("optimizer-unknown", _set("training.optimizer", "SGD9000"), "spec.training.optimizer"),
    BadSpec("precision-unknown", _set("training.mixedPrecision", "fp8"), "spec.training.mixedPrecision"),
    BadSpec("attention-unknown", _set("training.attention", "flash3"), "spec.training.attention"),
    BadSpec("scheduler-unknown", _set("training.lrScheduler", "warmup"), "spec.training.lrScheduler"),
    # ranges
    BadSpec("resolution-not-multiple-of-8", _set("dataset.resolution", 500), "spec.dataset.resolution"),
    BadSpec("resolution-too-small", _set("dataset.resolution", 32), "spec.dataset.resolution"),
    BadSpec("resolution-too-large", _set("dataset.resolution", 4096), "spec.dataset.resolution"),
    BadSpec("steps-zero", _set("training.stepsPerImage", 0), "spec.training.stepsPerImage"),
    BadSpec("max-steps-negative", _set("training.maxSteps", -5), "spec.training.maxSteps"),
    BadSpec("learning-rate-zero", _set("training.learningRate", 0), "spec.training.learningRate"),
    BadSpec("gpus-zero", _set("resources.gpus", 0), "spec.resources.gpus"),
    BadSpec("batch-size-zero", _set("training.batchSize", 0), "spec.training.batchSize"),
    BadSpec(
        "lora-rank-zero",
        _both(_set("method", "LoRA"), _set("training.lora", {"rank": 0})),
        "spec.training.lora.rank",
    ),
    # URI schemes
    BadSpec("base-model-ftp", _set("baseModel.uri", "ftp://example.com/model"), "spec.baseModel.uri"),
    BadSpec(
        "images-unknown-scheme",
        _set("dataset.instanceImages", "smb://share/x"),
        "spec.dataset.instanceImages",
    ),
    BadSpec("output-bad-pvc", _set("output.uri", "pvc://Not_A_Claim/x"), "spec.output.uri"),
    BadSpec("class-images-colon", _set("dataset.classImages", "c:weird"), "spec.dataset.classImages"),
    BadSpec(
        "priority-class-not-a-name",
        _both(_set("runPolicy.queueName", "gpu"), _set("runPolicy.priorityClass", "High Priority")),
        "spec.runPolicy.priorityClass",
    ),
    BadSpec("s3-endpoint-not-a-url", _set("storage.s3EndpointUrl", "minio:9000"), "spec.storage.s3EndpointUrl"),
    # paths that leave the claim's mount
    BadSpec("output-pvc-parent", _set("output.uri", "pvc://outputs/../.."), "spec.output.uri"),
    # '..' behind a query string passed admission, then stopped the operator's render each time.
    BadSpec("output-pvc-parent-query", _set("output.uri", "pvc://outputs/..?x"), "spec.output.uri"),
    BadSpec(
        "images-pvc-parent",
        _set("dataset.instanceImages", "pvc://datasets/nick/../../etc/"),
        "spec.dataset.instanceImages",
    ),
    BadSpec("queue-name-not-a-label", _set("runPolicy.queueName", "team a/gpus"), "spec.runPolicy.queueName"),
    # cross-field rules
    BadSpec(
        "prior-without-class-prompt",
        _set("dataset.priorPreservation", True),
        "spec.dataset.classPrompt",
    ),
    BadSpec(
        "mask-background-without-masks", _set("dataset.maskedLossBackground", 0.1), "spec.dataset.maskedLossBackground"
    ),
    BadSpec(
        "mask-folder-with-alpha",
        _set("dataset.masks", {"source": "alpha", "folder": "masks"}),
        "spec.dataset.masks.folder",
    ),
    BadSpec(
        "mask-background-above-one",
        _both(_set("dataset.masks", {}), _set("dataset.maskedLossBackground", 2)),
        "spec.dataset.maskedLossBackground",
    ),
    BadSpec("mask-folder-a-path", _set("dataset.masks", {"folder": "../elsewhere"}), "spec.dataset.masks.folder"),
    BadSpec("mask-source-unknown", _set("dataset.masks", {"source": "depth"}), "spec.dataset.masks.source"),
    BadSpec("ema-after-the-end", _set("training", {"maxSteps": 100, "ema": {"startStep": 101}}), "spec.training"),
    BadSpec("ema-decay-one", _set("training.ema", {"decay": 1}), "spec.training.ema.decay"),
    BadSpec("ema-every-zero", _set("training.ema", {"everySteps": 0}), "spec.training.ema.everySteps"),
    BadSpec("shm-over-memory", _set("resources", {"memory": "4Gi", "shmSize": "8Gi"}), "spec.resources"),
    BadSpec("shm-over-default-memory", _set("resources", {"shmSize": "64Gi"}), "spec.resources"),
    BadSpec("lora-with-dreambooth", _set("training.lora", {"rank": 4}), "spec.training.lora"),
    BadSpec("no-steps", _delete("training.stepsPerImage"), "spec.training.stepsPerImage"),
    # required fields
    BadSpec("no-base-model", _delete("baseModel"), "spec.baseModel"),
    BadSpec("no-instance-prompt", _delete("dataset.instancePrompt"), "spec.dataset.instancePrompt"),
    BadSpec("empty-instance-prompt", _set("dataset.instancePrompt", ""), "spec.dataset.instancePrompt"),
    BadSpec("blank-instance-prompt", _set("dataset.instancePrompt", " \t\n "), "spec.dataset.instancePrompt"),
    BadSpec("blank-class-prompt", _set("dataset.classPrompt", "   "), "spec.dataset.classPrompt"),
    BadSpec(
        "lora-targets-unknown",
        _both(_set("method", "LoRA"), _set("training.lora", {"targets": "everything"})),
        "spec.training.lora.targets",
    ),
    BadSpec("no-output", _delete("output"), "spec.output"),
    # datasets
    BadSpec(
        "images-and-concepts",
        _set("dataset.concepts", [{"images": "pvc://datasets/a/", "instancePrompt": "a photo of zqx"}]),
        "spec.dataset.instanceImages",
    ),
    BadSpec("no-images-no-concepts", _delete("dataset.instanceImages"), "spec.dataset.instanceImages"),
    BadSpec(
        "concept-blank-prompt",
        _both(
            _delete("dataset.instanceImages"),
            _delete("dataset.instancePrompt"),
            _set("dataset.concepts", [{"images": "pvc://datasets/a/", "instancePrompt": "  "}]),
        ),
        "instancePrompt",
    ),
    BadSpec("layout-unknown", _set("dataset.layout", "dreambooth"), "spec.dataset.layout"),
    BadSpec("bucket-side-not-64", _set("dataset.bucketMinSide", 300), "spec.dataset.bucketMinSide"),
    BadSpec("caption-dropout-over-one", _set("dataset.captionDropout", 1.5), "spec.dataset.captionDropout"),
    # flux1
    BadSpec("flux-dreambooth", _set("baseModel.type", "flux1"), "spec.method"),
    BadSpec(
        "components-for-sd",
        _set("baseModel.componentsUri", "pvc://models/flux-dev/"),
        "spec.baseModel.componentsUri",
    ),
    BadSpec(
        "components-bad-scheme",
        _both(
            _set("method", "LoRA"),
            _set("baseModel.type", "flux1"),
            _set("baseModel.componentsUri", "ftp://example.com/flux"),
        ),
        "spec.baseModel.componentsUri",
    ),
    BadSpec(
        "quantization-for-sd",
        _both(_set("method", "LoRA"), _set("training.baseQuantization", "nf4")),
        "spec.training.baseQuantization",
    ),
    BadSpec(
        "quantization-unknown",
        _both(_set("method", "LoRA"), _set("baseModel.type", "flux1"), _set("training.baseQuantization", "fp4")),
        "spec.training.baseQuantization",
    ),
    BadSpec("timesteps-for-sd", _set("training.timestepSampling", "uniform"), "spec.training.timestepSampling"),
    BadSpec(
        "timesteps-unknown",
        _both(_set("method", "LoRA"), _set("baseModel.type", "flux1"), _set("training.timestepSampling", "cosmap")),
        "spec.training.timestepSampling",
    ),
    BadSpec(
        "flux-merge-lora",
        _both(_set("method", "LoRA"), _set("baseModel.type", "flux1"), _set("output.mergeLoRA", True)),
        "spec.output.mergeLoRA",
    ),
    BadSpec(
        "lora-type-unknown",
        _both(_set("method", "LoRA"), _set("training.lora", {"type": "oft"})),
        "spec.training.lora.type",
    ),
    BadSpec(
        "lokr-factor-on-loha",
        _both(_set("method", "LoRA"), _set("training.lora", {"type": "loha", "factor": 4})),
        "spec.training.lora",
    ),
    BadSpec(
        "lokr-factor-below-minus-one",
        _both(_set("method", "LoRA"), _set("training.lora", {"type": "lokr", "factor": -2})),
        "spec.training.lora.factor",
    ),
    BadSpec(
        "decompose-both-on-lora",
        _both(_set("method", "LoRA"), _set("training.lora", {"decomposeBoth": True})),
        "spec.training.lora",
    ),
    BadSpec(
        "dropout-on-lokr",
        _both(_set("method", "LoRA"), _set("training.lora", {"type": "lokr", "dropout": 0.1})),
        "spec.training.lora",
    ),
    BadSpec(
        "flux-loha",
        _both(_set("method", "LoRA"), _set("baseModel.type", "flux1"), _set("training.lora", {"type": "loha"})),
        "spec.training.lora.type",
    ),
    BadSpec("ti-without-its-word", _set("method", "TextualInversion"), "spec.textualInversion"),
    BadSpec(
        "ti-word-with-dreambooth",
        _set("textualInversion", {"token": "sks", "initializer": "dog"}),
        "spec.textualInversion",
    ),
    BadSpec(
        "ti-prompt-without-the-word",
        _both(_set("method", "TextualInversion"), _set("textualInversion", {"token": "<zqx>", "initializer": "dog"})),
        "spec.dataset.instancePrompt",
    ),
    BadSpec(
        "ti-on-flux",
        _both(
            _set("method", "TextualInversion"),
            _set("baseModel.type", "flux1"),
            _set("textualInversion", {"token": "sks", "initializer": "dog"}),
        ),
        "spec.method",
    ),
    BadSpec(
        "ti-with-text-encoder-training",
        _both(
            _set("method", "TextualInversion"),
            _set("textualInversion", {"token": "sks", "initializer": "dog"}),
            _set("training.trainTextEncoder", True),
        ),
        "spec.training.trainTextEncoder",
    ),
    BadSpec(
        "ti-token-with-a-space",
        _both(_set("method", "TextualInversion"), _set("textualInversion", {"token": "s ks", "initializer": "dog"})),
        "spec.textualInversion.token",
    ),
    BadSpec(
        "ti-no-vectors",
        _both(
            _set("method", "TextualInversion"),
            _set("textualInversion", {"token": "sks", "initializer": "dog", "vectors": 0}),
        ),
        "spec.textualInversion.vectors",
    ),
    BadSpec(
        "pivotal-prompt-without-the-word",
        _both(_set("method", "LoRA"), _set("training.lora", {"newTokens": {"token": "<zqx>", "initializer": "dog"}})),
        "spec.dataset.instancePrompt",
    ),
    BadSpec(
        "pivotal-on-flux",
        _both(
            _set("method", "LoRA"),
            _set("baseModel.type", "flux1"),
            _set("training.lora", {"newTokens": {"token": "sks", "initializer": "dog"}}),
        ),
        "spec.training.lora.newTokens",
    ),
    BadSpec(
        "pivotal-merged",
        _both(
            _set("method", "LoRA"),
            _set("output.mergeLoRA", True),
            _set("training.lora", {"newTokens": {"token": "sks", "initializer": "dog"}}),
        ),
        "spec.output.mergeLoRA",
    ),
    BadSpec(
        "pivotal-with-ema",
        _both(
            _set("method", "LoRA"),
            _set("training.ema", {"decay": 0.99}),
            _set("training.lora", {"newTokens": {"token": "sks", "initializer": "dog"}}),
        ),
        "spec.training.ema",
    ),
    BadSpec(
        "pivotal-fraction-zero",
        _both(
            _set("method", "LoRA"),
            _set("training.lora", {"newTokens": {"token": "sks", "initializer": "dog", "trainFraction": 0}}),
        ),
        "spec.training.lora.newTokens.trainFraction",
    ),
    BadSpec("select-best-without-evaluation", _set("output.select", "best"), "spec.output.select"),
    BadSpec(
        "evaluation-unknown-floor",
        _set("evaluation", {"prompts": ["a sks dog"], "dinoModel": "hf://facebook/dino-vits16", "floors": {"fid": 1}}),
        "spec.evaluation",
    ),
    BadSpec(
        "evaluation-dino-without-its-model",
        _set("evaluation", {"prompts": ["a sks dog"], "clipModel": "hf://openai/clip-vit-base-patch32"}),
        "spec.evaluation",
    ),
    BadSpec(
        "evaluation-clip-floor-without-its-model",
        _set(
            "evaluation", {"prompts": ["a sks dog"], "dinoModel": "hf://facebook/dino-vits16", "floors": {"clipT": 0.2}}
        ),
        "spec.evaluation",
    ),
    BadSpec(
        "evaluation-no-prompts",
        _set("evaluation", {"prompts": [], "dinoModel": "hf://facebook/dino-vits16"}),
        "spec.evaluation",
    ),
    BadSpec("evaluation-nothing-to-score", _set("evaluation", {"prompts": ["a sks dog"]}), "spec.evaluation"),
    BadSpec(
        "evaluation-rank-by-held-out-loss-without-photos",
        _set("evaluation", {"dinoModel": "hf://facebook/dino-vits16", "prompts": ["x"], "rankBy": "holdOutLoss"}),
        "spec.evaluation",
    ),
    BadSpec("memory-zero", _set("resources.memory", "0"), "spec.resources.memory"),
    BadSpec("cpu-zero", _set("resources.cpu", "0.0"), "spec.resources.cpu"),
    BadSpec("gpu-resource-memory", _set("resources.gpuResource", "memory"), "spec.resources.gpuResource"),
    BadSpec(
        "gpu-resource-kubernetes-io", _set("resources.gpuResource", "kubernetes.io/gpu"), "spec.resources.gpuResource"
    ),
    BadSpec("merge-lora-with-dreambooth", _set("output.mergeLoRA", True), "spec.output.mergeLoRA"),
    BadSpec(
        "placement-profile-name", _set("resources.placementProfile", "A100 nodes"), "spec.resources.placementProfile"
    ),
]


# Valid for `finetune-trainer run` on a workstation, refused by the cluster's admission (the
# CRD) and by the operator: a plain path or file:// in a pod is the pod's own file system.
CLUSTER_ONLY_BAD_SPECS = [
    BadSpec("base-model-plain-path", _set("baseModel.uri", "/models/sd15"), "spec.baseModel.uri"),
    BadSpec("images-file-uri", _set("dataset.instanceImages", "file:///data/nick"), "spec.dataset.instanceImages"),
    BadSpec("class-images-relative", _set("dataset.classImages", "men/"), "spec.dataset.classImages"),
    BadSpec("output-file-uri", _set("output.uri", "file:///outputs/nick"), "spec.output.uri"),
]


def bad_manifest(case: BadSpec, name: str = "bad") -> dict[str, Any]:
    manifest = copy.deepcopy(good_manifest(name))
    case.change(manifest)
    return manifest


def rule_cases() -> list[tuple[Rule, BadSpec]]:
    """Each rule of ``finetune_api.rules`` with the bad specs that break it: the models' refusal
    carries the rule's message (the cluster-only rule's cases are CLUSTER_ONLY_BAD_SPECS)."""
    from finetune_api import ManifestError, parse_manifest
    from finetune_api.rules import TABLES

    cases = []
    for table in TABLES.values():
        for rule in table:
            if not rule.models:
                cases += [(rule, case) for case in CLUSTER_ONLY_BAD_SPECS]
                continue
            for case in BAD_SPECS:
                try:
                    parse_manifest(bad_manifest(case))
                except ManifestError as refused:
                    if rule.message in str(refused):
                        cases.append((rule, case))
    return cases


def crd_validations(node: Any) -> list[dict[str, str]]:
    """Every ``x-kubernetes-validations`` entry (rule, message) anywhere in a CRD or schema."""
    found: list[dict[str, str]] = []
    if isinstance(node, dict):
        found += node.get("x-kubernetes-validations", [])
        for value in node.values():
            found += crd_validations(value)
    elif isinstance(node, list):
        for value in node:
            found += crd_validations(value)
    return found
