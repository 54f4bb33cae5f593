"""The FineTuneJob's validation rules, each written once: the CEL expression the CRD carries (the
apiserver checks it at admission), the Python predicate the models run (the trainer reads manifests
that never went through an apiserver), and one message for both, which says what is wrong and the
fix.  ``v1alpha1.py`` attaches each table to its field or model; tests run every bad spec through
both sides and compare their words (tests/unit/test_rules.py, tests/cluster/test_control_plane.py).

A field's rule gets the field's value (never None: an absent field has nothing to check); a
model's rule gets the model.  The apiserver and the models both put the field's path in front of
a field rule's message, so the message does not repeat it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# One regular expression for pydantic and CEL (RE2 accepts each as written).
URI_PATTERN = r"^((hf|pvc|s3|gs|https?|file)://[^\s]+|[^:\s][^:]*)$"
# No query or fragment: the pod sees a path, and `pvc://c/..?x` would hide a '..' from the rule below.
PVC_PATTERN = r"^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[^?#]*)?$"
URI_HELP = "hf://, pvc://CLAIM/path, s3://, gs://, https://, file:// or a plain path"
# A ".." segment in a pvc:// path would resolve outside the claim's mount in the pod.
PVC_PARENT_PATTERN = r"/\.\.(/|$)"
# What a pod can reach: a plain path or file:// would be read (or written) inside the pod's
# own file system, which vanishes with it.  They stay valid for `finetune-trainer run` on a
# workstation, so only the CRD (the cluster's admission) refuses them, not the models.
CLUSTER_URI_PATTERN = r"^(hf|pvc|s3|gs|https?)://"
CLUSTER_URI_HELP = "pvc://CLAIM/path, s3://, gs://, hf:// or https://"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
ENDPOINT_PATTERN = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"
# A Kubernetes object name that is also a label value (Kueue reads it from a label).
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# An extended resource: domain/name, outside Kubernetes' own domain (cpu, memory, ephemeral-storage
# and the kubernetes.io names are the node's own resources, never a GPU).
EXTENDED_RESOURCE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z0-9]([-a-z0-9]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
KUBERNETES_DOMAIN_PATTERN = r"^([^/]*\.)?kubernetes\.io/"
# A prompt must say something: at least one character that is not whitespace.
NOT_BLANK = r"\S"


@dataclass(frozen=True)
class Rule:
    """One rule: ``cel`` and ``holds`` are true of a valid value; ``models``: False for a rule only
    a cluster enforces (the operator checks specs an older CRD admitted itself)."""

    cel: str
    message: str
    holds: Callable[[Any], bool]
    models: bool = True

    def as_cel(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message}


def cel(rules: Sequence[Rule]) -> dict[str, Any]:
    """The ``json_schema_extra`` that puts ``rules`` into the CRD."""
    return {"x-kubernetes-validations": [rule.as_cel() for rule in rules]}


def enforce(value: Any, rules: Sequence[Rule], *, show_value: bool = False) -> Any:
    """``value`` if every rule the models enforce holds; else ValueError with the first broken
    rule's message (and the value, for a field's, where it helps)."""
    if value is None:
        return value
    for rule in rules:
        if rule.models and not rule.holds(value):
            raise ValueError(f"{rule.message}; got {value!r}" if show_value else rule.message)
    return value


_QUANTITY_SUFFIXES = {
    "": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
}  # fmt: skip


def quantity_value(text: str) -> float:
    """A quantity of QUANTITY_PATTERN as a number (what CEL's quantity() compares)."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", text)
    if match is None or match[2] not in _QUANTITY_SUFFIXES:
        raise ValueError(f"not a quantity: {text!r}")
    return float(match[1]) * _QUANTITY_SUFFIXES[match[2]]


def _matches(pattern: str) -> Callable[[Any], bool]:
    return lambda value: re.search(pattern, value) is not None


# --- a field's rules ------------------------------------------------------------------------------

URI = (
    Rule(f"self.matches(r'{URI_PATTERN}')", f"must be {URI_HELP}", _matches(URI_PATTERN)),
    Rule(
        f"!self.startsWith('pvc://') || self.matches(r'{PVC_PATTERN}')",
        "a pvc:// URI is pvc://CLAIM/path where CLAIM is a PersistentVolumeClaim name (and no ? or # follows)",
        lambda v: not v.startswith("pvc://") or re.match(PVC_PATTERN, v) is not None,
    ),
    Rule(
        f"!self.startsWith('pvc://') || !self.matches(r'{PVC_PARENT_PATTERN}')",
        "a pvc:// path may not contain '..'; name a folder inside the claim, e.g. pvc://CLAIM/path",
        lambda v: not v.startswith("pvc://") or re.search(PVC_PARENT_PATTERN, v) is None,
    ),
    Rule(
        f"self.matches(r'{CLUSTER_URI_PATTERN}')",
        "a plain path or file:// URI would be inside the training pod and vanish with it; "
        f"in a cluster use {CLUSTER_URI_HELP} (plain paths are for finetune-trainer run on a workstation)",
        _matches(CLUSTER_URI_PATTERN),
        models=False,
    ),
)
CLUSTER_URI = URI[-1]

PROMPT = (
    Rule(
        f"self.matches(r'{NOT_BLANK}')",
        "is empty or only whitespace: write the prompt that describes the images, e.g. 'a photo of nickxxxawesome'",
        _matches(NOT_BLANK),
    ),
)

S3_ENDPOINT = (
    Rule(
        f"self.matches(r'{ENDPOINT_PATTERN}')",
        "must be an http:// or https:// URL such as http://minio:9000",
        _matches(ENDPOINT_PATTERN),
    ),
)

QUEUE_NAME = (
    Rule(
        f"self.matches(r'{LABEL_VALUE_PATTERN}')",
        "must be a Kueue LocalQueue name, which is a label value: letters, digits, '-', '_' and '.', "
        "beginning and ending with a letter or digit",
        _matches(LABEL_VALUE_PATTERN),
    ),
)

PRIORITY_CLASS = (
    Rule(
        f"self == '' || self.matches(r'{OBJECT_NAME_PATTERN}')",
        "must name a Kueue WorkloadPriorityClass: lowercase letters, digits, '-' and '.', "
        "starting and ending with a letter or digit (e.g. high)",
        lambda v: v == "" or re.match(OBJECT_NAME_PATTERN, v) is not None,
    ),
)


# A quantity of the pattern QUANTITY_PATTERN is more than zero where a digit is not 0.
POSITIVE_QUANTITY = (
    Rule(
        "self.matches('[1-9]')",
        "must be more than zero, e.g. '4' (CPUs) or '32Gi' (memory): a pod asks for it and is held to it",
        _matches("[1-9]"),
    ),
)

GPU_RESOURCE = (
    Rule(
        f"self.matches(r'{EXTENDED_RESOURCE_PATTERN}') && !self.matches(r'{KUBERNETES_DOMAIN_PATTERN}')",
        "must be a GPU's extended resource, domain/name such as nvidia.com/gpu or amd.com/gpu: a node's own "
        "resource (memory, cpu) would ask for no GPU at all",
        lambda v: re.match(EXTENDED_RESOURCE_PATTERN, v) is not None and re.match(KUBERNETES_DOMAIN_PATTERN, v) is None,
    ),
)


# --- a model's rules (several fields) -------------------------------------------------------------

DATASET_SOURCE = "set spec.dataset.instanceImages (one subject) or spec.dataset.concepts (several), not both"


def _prior_prompts(dataset: Any) -> bool:
    if not dataset.prior_preservation or dataset.layout == "kohya":
        # kohya's regularisation folders name their class (the trainer checks there are some).
        return True
    if dataset.concepts is not None:
        return all(c.class_prompt for c in dataset.concepts)
    return bool(dataset.class_prompt)


DATASET = (
    Rule(
        "has(self.instanceImages) != has(self.concepts)",
        DATASET_SOURCE,
        lambda d: (d.instance_images is None) != (d.concepts is None),
    ),
    Rule(
        "!has(self.instanceImages) || has(self.instancePrompt) || self.layout == 'kohya'",
        "spec.dataset.instancePrompt is required unless spec.dataset.layout is kohya (prompts from folder names): "
        "set it, e.g. 'a photo of nickxxxawesome'",
        lambda d: d.instance_images is None or d.instance_prompt is not None or d.layout == "kohya",
    ),
    Rule(
        "!self.priorPreservation || has(self.classPrompt) || "
        "(has(self.concepts) && self.concepts.all(c, has(c.classPrompt))) || self.layout == 'kohya'",
        "spec.dataset.priorPreservation needs spec.dataset.classPrompt (e.g. 'a photo of a man'), a classPrompt "
        "on every concept, or with layout kohya regularisation folders; or turn priorPreservation off",
        _prior_prompts,
    ),
    Rule(
        "!has(self.maskedLossBackground) || has(self.masks)",
        "spec.dataset.maskedLossBackground weights the background of masked photos: set spec.dataset.masks "
        "(source folder or alpha) or remove it",
        lambda d: d.masked_loss_background is None or d.masks is not None,
    ),
    Rule(
        "!has(self.masks) || !has(self.masks.folder) || self.masks.source == 'folder'",
        "spec.dataset.masks.folder is for source folder; with source alpha the masks are the photos' own "
        "transparency: remove folder",
        lambda d: d.masks is None or d.masks.folder is None or d.masks.source == "folder",
    ),
)

SHM_OVER_MEMORY = (
    "spec.resources.shmSize is more than spec.resources.memory: /dev/shm is memory, counted against the pod's "
    "memory limit; lower shmSize or raise memory"
)

RESOURCES = (
    Rule(
        "!has(self.shmSize) || !has(self.memory) || quantity(self.shmSize).compareTo(quantity(self.memory)) <= 0",
        SHM_OVER_MEMORY,
        lambda r: r.shm_size is None or quantity_value(r.shm_size) <= quantity_value(r.memory),
    ),
)

EMA_AFTER_THE_END = (
    "spec.training.ema.startStep is after the run's last step, so the average would be the base model's "
    "weights: lower startStep below the steps of the run"
)

TRAINING = (
    Rule(
        "has(self.stepsPerImage) || has(self.maxSteps)",
        "set spec.training.stepsPerImage (e.g. 150, as the web UI) or spec.training.maxSteps",
        lambda t: t.steps_per_image is not None or t.max_steps is not None,
    ),
    Rule(
        "!has(self.ema) || !has(self.maxSteps) || !has(self.ema.startStep) || self.ema.startStep <= self.maxSteps",
        EMA_AFTER_THE_END,
        lambda t: t.ema is None or t.max_steps is None or t.ema.start_step <= t.max_steps,
    ),
)

# Model rules of spec.training.lora: the apiserver and the models put that path in front.
LORA = (
    Rule(
        "!has(self.factor) || self.type == 'lokr'",
        "factor is for type lokr (the size of a Kronecker product's small matrix); set type: lokr or remove factor",
        lambda a: a.factor is None or a.type == "lokr",
    ),
    Rule(
        "!has(self.decomposeBoth) || self.type == 'lokr'",
        "decomposeBoth is for type lokr; set type: lokr or remove decomposeBoth",
        lambda a: a.decompose_both is None or a.type == "lokr",
    ),
    Rule(
        "!has(self.dropout) || self.dropout == 0.0 || self.type == 'lora' || self.type == 'locon' || "
        "self.type == 'dora'",
        "dropout is for type lora, locon and dora: LoHa and LoKr (peft's, as LyCORIS' defaults) have no dropout on "
        "the layer's input; remove dropout or set it to 0",
        lambda a: a.dropout == 0 or a.type in ("lora", "locon", "dora"),
    ),
)

# Model rules of spec.evaluation.
EVALUATION = (
    Rule(
        "has(self.clipModel) || has(self.dinoModel) || self.holdOut > 0",
        "nothing to score: set dinoModel or clipModel (with prompts), or holdOut",
        lambda e: e.clip_model is not None or e.dino_model is not None or e.hold_out > 0,
    ),
    Rule(
        "size(self.prompts) > 0 || (!has(self.clipModel) && !has(self.dinoModel))",
        "prompts: the scoring models score images rendered from prompts; give at least one",
        lambda e: len(e.prompts) > 0 or (e.clip_model is None and e.dino_model is None),
    ),
    Rule(
        "self.floors.all(k, k in ['dino', 'clipI', 'clipT'])",
        "floors: the scores with a floor are dino, clipI and clipT (e.g. clipT: 0.25)",
        lambda e: all(k in ("dino", "clipI", "clipT") for k in e.floors),
    ),
    Rule(
        "self.rankBy != 'holdOutLoss' || self.holdOut > 0",
        "rankBy: holdOutLoss needs holdOut photos (e.g. holdOut: 2)",
        lambda e: e.rank_by != "holdOutLoss" or e.hold_out > 0,
    ),
    Rule(
        "has(self.dinoModel) || (self.rankBy != 'dino' && !('dino' in self.floors))",
        "dinoModel is needed to score dino (rankBy or floors): set dinoModel (e.g. hf://facebook/dino-vits16) or "
        "rank by clipI or clipT",
        lambda e: e.dino_model is not None or (e.rank_by != "dino" and "dino" not in e.floors),
    ),
    Rule(
        "has(self.clipModel) || ((self.rankBy == 'dino' || self.rankBy == 'holdOutLoss') && "
        "!('clipI' in self.floors) && !('clipT' in self.floors))",
        "clipModel is needed to score clipI and clipT (rankBy or floors): set clipModel (e.g. "
        "hf://openai/clip-vit-base-patch32)",
        lambda e: (
            e.clip_model is not None
            or (e.rank_by in ("dino", "holdOutLoss") and not {"clipI", "clipT"} & set(e.floors))
        ),
    ),
)

FLUX_LORA_ONLY = (
    "spec.method: flux1 trains LoRA only (a full Flux.1 fine-tune needs several 80 GB GPUs); set spec.method: LoRA"
)
FLUX_COMPONENTS = (
    "spec.baseModel.componentsUri is for type flux1 (the text encoders, VAE and scheduler of a single-file "
    "transformer); remove it or set spec.baseModel.type: flux1"
)
FLUX_QUANTIZATION = (
    "spec.training.baseQuantization quantizes a flux1 transformer under LoRA; set it to none (or remove it) for "
    "other model types"
)
FLUX_TIMESTEPS = (
    "spec.training.timestepSampling is for flux1 (flow matching); remove it for other model types, which draw "
    "timesteps uniformly"
)
FLUX_MERGE = (
    "spec.output.mergeLoRA: a Flux.1 LoRA is not merged into a full model here (24 GB in bf16); load the LoRA onto "
    "the base instead (diffusers' load_lora_weights, ComfyUI's LoRA loader) and remove mergeLoRA"
)

FLUX_LORA_TYPE = (
    "spec.training.lora.type: flux1 takes type lora only (its kohya-layout file fuses q, k and v into one layer, "
    "which LoHa, LoKr and DoRA adapters of the parts cannot be written as, and its transformer has no "
    "convolutions for LoCon); set type: lora"
)


def _flux(spec: Any) -> bool:
    return bool(spec.base_model.type == "flux1")


TI_METHOD = "spec.textualInversion is the word a method TextualInversion run learns: set both, or neither"
TI_PROMPT = (
    "spec.dataset.instancePrompt must contain spec.textualInversion.token: the prompts are how the new word is "
    "learned (e.g. a photo of <zqx>)"
)
TI_FAMILIES = (
    "spec.method: TextualInversion is for v1x, v2x-512, v2x and sdxl (Flux.1's T5 has no embeddings people load); "
    "use method LoRA for flux1"
)
TI_ALONE = (
    "spec.training.trainTextEncoder and spec.training.ema are not for method TextualInversion, which trains the new "
    "word's vectors only; remove them"
)

PIVOTAL = "spec.training.lora.newTokens"
PIVOTAL_PROMPT = (
    f"spec.dataset.instancePrompt must contain {PIVOTAL}.token: the prompts are how the new word is learned "
    "(e.g. a photo of <zqx> dog)"
)
PIVOTAL_FAMILIES = (
    f"{PIVOTAL} is for v1x, v2x-512, v2x and sdxl (Flux.1's T5 has no embeddings people load); remove it for flux1"
)
PIVOTAL_MERGE = (
    f"spec.output.mergeLoRA: a merged model's single file cannot hold {PIVOTAL}' word (the web UIs' tokenizers "
    "are fixed); load the LoRA and the embedding together instead, and remove mergeLoRA"
)
PIVOTAL_EMA = (
    f"spec.training.ema is not for {PIVOTAL}: the average would hold every text encoder's whole embedding table; "
    "remove one of them"
)


def _new_tokens(spec: Any) -> Any:
    return None if spec.training.lora is None else spec.training.lora.new_tokens


_HAS_NEW_TOKENS = "has(self.training.lora) && has(self.training.lora.newTokens)"

SPEC = (
    Rule(
        "(self.method == 'TextualInversion') == has(self.textualInversion)",
        TI_METHOD,
        lambda s: (s.method == "TextualInversion") == (s.textual_inversion is not None),
    ),
    Rule(
        "!has(self.textualInversion) || !has(self.dataset.instancePrompt) || "
        "self.dataset.instancePrompt.contains(self.textualInversion.token)",
        TI_PROMPT,
        lambda s: (
            s.textual_inversion is None
            or s.dataset.instance_prompt is None
            or s.textual_inversion.token in s.dataset.instance_prompt
        ),
    ),
    Rule(
        "self.method != 'TextualInversion' || self.baseModel.type != 'flux1'",
        TI_FAMILIES,
        lambda s: s.method != "TextualInversion" or not _flux(s),
    ),
    Rule(
        "self.method != 'TextualInversion' || ((!has(self.training.trainTextEncoder) || "
        "!self.training.trainTextEncoder) && !has(self.training.ema))",
        TI_ALONE,
        lambda s: s.method != "TextualInversion" or (not s.training.train_text_encoder and s.training.ema is None),
    ),
    Rule(
        f"!({_HAS_NEW_TOKENS}) || !has(self.dataset.instancePrompt) || "
        "self.dataset.instancePrompt.contains(self.training.lora.newTokens.token)",
        PIVOTAL_PROMPT,
        lambda s: (
            _new_tokens(s) is None
            or s.dataset.instance_prompt is None
            or _new_tokens(s).token in s.dataset.instance_prompt
        ),
    ),
    Rule(
        f"!({_HAS_NEW_TOKENS}) || self.baseModel.type != 'flux1'",
        PIVOTAL_FAMILIES,
        lambda s: _new_tokens(s) is None or not _flux(s),
    ),
    Rule(
        f"!({_HAS_NEW_TOKENS}) || !self.output.mergeLoRA",
        PIVOTAL_MERGE,
        lambda s: _new_tokens(s) is None or not s.output.merge_lora,
    ),
    Rule(
        f"!({_HAS_NEW_TOKENS}) || !has(self.training.ema)",
        PIVOTAL_EMA,
        lambda s: _new_tokens(s) is None or s.training.ema is None,
    ),
    Rule(
        "self.output.select != 'best' || has(self.evaluation)",
        "spec.output.select: best picks the checkpoint spec.evaluation ranks first; set spec.evaluation (prompts and "
        "a scoring model) or select: last",
        lambda s: s.output.select != "best" or s.evaluation is not None,
    ),
    Rule(
        "self.method == 'LoRA' || !has(self.training.lora)",
        "spec.training.lora is only for method LoRA: set spec.method: LoRA or remove it",
        lambda s: s.method == "LoRA" or s.training.lora is None,
    ),
    Rule(
        "self.method == 'LoRA' || !self.output.mergeLoRA",
        "spec.output.mergeLoRA is only for method LoRA",
        lambda s: s.method == "LoRA" or not s.output.merge_lora,
    ),
    Rule(
        "self.baseModel.type != 'flux1' || self.method == 'LoRA'",
        FLUX_LORA_ONLY,
        lambda s: not _flux(s) or s.method == "LoRA",
    ),
    Rule(
        "!has(self.baseModel.componentsUri) || self.baseModel.type == 'flux1'",
        FLUX_COMPONENTS,
        lambda s: s.base_model.components_uri is None or _flux(s),
    ),
    Rule(
        "!has(self.training.baseQuantization) || self.training.baseQuantization == 'none' || "
        "self.baseModel.type == 'flux1'",
        FLUX_QUANTIZATION,
        lambda s: s.training.base_quantization == "none" or _flux(s),
    ),
    Rule(
        "!has(self.training.timestepSampling) || self.baseModel.type == 'flux1'",
        FLUX_TIMESTEPS,
        lambda s: s.training.timestep_sampling is None or _flux(s),
    ),
    Rule(
        "self.baseModel.type != 'flux1' || !has(self.training.lora) || !has(self.training.lora.type) || "
        "self.training.lora.type == 'lora'",
        FLUX_LORA_TYPE,
        lambda s: not _flux(s) or s.training.lora is None or s.training.lora.type == "lora",
    ),
    Rule(
        "self.baseModel.type != 'flux1' || !self.output.mergeLoRA",
        FLUX_MERGE,
        lambda s: not (_flux(s) and s.output.merge_lora),
    ),
)

# Every table, for the tests that run each rule through both sides.
TABLES: dict[str, tuple[Rule, ...]] = {
    "uri": URI,
    "prompt": PROMPT,
    "s3Endpoint": S3_ENDPOINT,
    "queueName": QUEUE_NAME,
    "priorityClass": PRIORITY_CLASS,
    "quantity": POSITIVE_QUANTITY,
    "gpuResource": GPU_RESOURCE,
    "dataset": DATASET,
    "resources": RESOURCES,
    "training": TRAINING,
    "lora": LORA,
    "evaluation": EVALUATION,
    "spec": SPEC,
}
