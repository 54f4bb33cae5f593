"""What a FineTuneJob may name on this cluster, as the platform team set it: the trainer image,
the Secret of credentials, the claims it mounts and the claims it writes to, the priority class
and where its pod may run.

Creating a FineTuneJob creates a pod; without a policy its author picks the pod's image, mounts
any Secret of the namespace, writes to any claim of it and places the pod on any node, at any
priority, asking for any extended resource.  The platform team sets six lists of prefixes (the
chart's ``jobPolicy``); a name must start with one of its list's prefixes, and an empty list
allows any.  It may also define
placement profiles (node selector, tolerations, affinity, priority class) that a job picks by
name, and hold jobs to them (no free placement).  The same rules are enforced twice, in the same
words, from this module:

- at admission, by the ValidatingAdmissionPolicy ``job-policy.finetune.dev`` (``build_policy``,
  generated into ``crds/`` by ``make crds``), whose params are a ConfigMap holding each list
  comma-separated under its key (the chart makes it and binds the policy to it), on CREATE;
- by the operator before it renders a Job (``problems``, with the lists from its
  ``--allowed-*`` flags), for a FineTuneJob admitted before the policy, or with it bypassed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from finetune_api.crd import HEADER, LABELS, generate
from finetune_api.rules import quantity_value
from finetune_api.v1alpha1 import GROUP, PLURAL, FineTuneJobSpec, Resources, _Model

NAME = f"job-policy.{GROUP}"
POLICY_FILE = Path("crds") / f"{NAME}.yaml"
REASON = "Forbidden"

# The params ConfigMap's keys, the chart's jobPolicy keys, and what each list holds.
IMAGES, SECRETS, CLAIMS, WRITABLE_CLAIMS = "images", "secrets", "claims", "writableClaims"
PRIORITY_CLASSES, GPU_RESOURCES = "priorityClasses", "gpuResources"
# The most one job may ask for (the chart's jobLimits): a number of GPUs and a quantity; "0", "": none.
MAX_GPUS, MAX_MEMORY = "maxGPUs", "maxMemory"
# The profiles' names, comma-separated; "false" under FREE_PLACEMENT holds jobs to them.
PROFILES, FREE_PLACEMENT = "placementProfiles", "freePlacement"
PREFIX_LISTS = (IMAGES, SECRETS, CLAIMS, WRITABLE_CLAIMS, PRIORITY_CLASSES, GPU_RESOURCES)
# spec.resources.gpuResource unset: the operator's own (--gpu-resource), which no list holds.
CLUSTER_GPU = Resources.model_fields["gpu_resource"].default
# What a job places its pod with itself (spec.resources), which free placement allows.
FREE_FIELDS = (
    ("nodeSelector", "node_selector"),
    ("tolerations", "tolerations"),
    ("affinity", "affinity"),
    ("priorityClassName", "priority_class_name"),
)


class PlacementProfile(_Model):
    """Where the pods of the jobs that name it run, as the platform team set it."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: str = ""


def parse_profiles(text: str, source: str = "--placement-profiles") -> dict[str, PlacementProfile]:
    """``{"name": {"nodeSelector": ..., "tolerations": [...], ...}}`` (JSON) -> profiles by name;
    ValueError naming ``source`` and the profile."""
    try:
        raw = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f'{source} must be a JSON object of profiles by name, e.g. {{"a100": {{"nodeSelector": ...}}}}'
        )
    profiles: dict[str, PlacementProfile] = {}
    for name, body in raw.items():
        try:
            profiles[name] = PlacementProfile.model_validate(body)
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the profile'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"{source}: profile {name!r}: {errors}") from None
    return profiles


@dataclass(frozen=True)
class JobPolicy:
    """Prefixes by list (an empty tuple allows any name), and the placement profiles."""

    images: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    claims: tuple[str, ...] = ()
    writable_claims: tuple[str, ...] = ()
    priority_classes: tuple[str, ...] = ()
    gpu_resources: tuple[str, ...] = ()
    profiles: Mapping[str, PlacementProfile] = dataclasses.field(default_factory=dict)
    # False: a job's pod is placed by its profile alone (FREE_FIELDS refused).
    free_placement: bool = True
    # The most one job may ask for; 0 and "": no limit.
    max_gpus: int = 0
    max_memory: str = ""

    @classmethod
    def from_lists(
        cls,
        *,
        profiles: Mapping[str, PlacementProfile] | None = None,
        free_placement: bool = True,
        max_gpus: int = 0,
        max_memory: str = "",
        **lists: str,
    ) -> JobPolicy:
        """From comma-separated lists (the ConfigMap's values, the operator's flags)."""
        return cls(
            profiles=dict(profiles or {}),
            free_placement=free_placement,
            max_gpus=max_gpus,
            max_memory=max_memory,
            **{key: split(value) for key, value in lists.items()},
        )  # fmt: skip


def split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def refusal(what: str, name: str, allowed: Iterable[str], key: str) -> str:
    """The one sentence both enforcers give (the admission policy builds it in CEL)."""
    return (
        f"{what} {name} is not allowed on this cluster: it must start with one of {','.join(allowed)} "
        f"(the chart's jobPolicy.{key}; ask the platform team)"
    )


def profile_names(names: Iterable[str]) -> str:
    return ",".join(sorted(names)) or "(none defined)"


def unknown_profile(name: str, names: str) -> str:
    return (
        f"placement profile {name} is not defined on this cluster: it must be one of {names} "
        f"(the chart's jobPolicy.{PROFILES}; ask the platform team)"
    )


def too_much(asked: str, most: str, flag: str, key: str, less: str) -> str:
    """A job asking for more than the cluster lets one job have."""
    return (
        f"{asked} is more than a job may ask for on this cluster (at most {most}: the operator's {flag}, "
        f"the chart's jobLimits.{key}); ask for {less}"
    )


def not_free(names: str) -> str:
    """A job's own placement where the cluster holds jobs to its profiles."""
    return (
        "free placement is not allowed on this cluster: pods are placed by a profile, "
        f"spec.resources.placementProfile, one of {names} (the chart's jobPolicy.{FREE_PLACEMENT}; "
        "ask the platform team)"
    )


def claim_uses(spec: FineTuneJobSpec) -> list[tuple[str, str, bool]]:
    """Every URI that may name a claim: (field, URI, whether the trainer writes there)."""
    uses: list[tuple[str, str | None, bool]] = [
        ("spec.baseModel.uri", spec.base_model.uri, False),
        ("spec.baseModel.vaeUri", spec.base_model.vae_uri, False),
        # A single-file Flux transformer's text encoders, VAE and scheduler.
        ("spec.baseModel.componentsUri", spec.base_model.components_uri, False),
        ("spec.dataset.instanceImages", spec.dataset.instance_images, False),
        # Class images generated when missing are saved there for reuse.
        ("spec.dataset.classImages", spec.dataset.class_images, True),
        ("spec.output.uri", spec.output.uri, True),
    ]
    if spec.evaluation is not None:
        uses += [
            ("spec.evaluation.clipModel", spec.evaluation.clip_model, False),
            ("spec.evaluation.dinoModel", spec.evaluation.dino_model, False),
        ]
    for index, concept in enumerate(spec.dataset.concepts or ()):
        uses += [
            (f"spec.dataset.concepts[{index}].images", concept.images, False),
            (f"spec.dataset.concepts[{index}].classImages", concept.class_images, True),
        ]
    return [(field, uri, writes) for field, uri, writes in uses if uri]


def claim_of(uri: str) -> str | None:
    """``pvc://claim/path`` -> ``claim``; None for any other URI."""
    if not uri.startswith("pvc://"):
        return None
    return uri[len("pvc://") :].split("/", 1)[0]


def problems(spec: FineTuneJobSpec, policy: JobPolicy) -> list[str]:
    """Sentences naming each field whose name the policy does not allow."""
    found: list[str] = []

    def check(field: str, what: str, name: str, allowed: tuple[str, ...], key: str) -> None:
        if allowed and not any(name.startswith(prefix) for prefix in allowed):
            found.append(f"{field}: {refusal(what, name, allowed, key)}")

    if spec.image:
        check("spec.image", "image", spec.image, policy.images, IMAGES)
    if spec.base_model.credentials_secret:
        check("spec.baseModel.credentialsSecret", "Secret", spec.base_model.credentials_secret, policy.secrets, SECRETS)
    resources, names = spec.resources, profile_names(policy.profiles)
    if policy.max_gpus and resources.gpus > policy.max_gpus:
        found.append("spec.resources.gpus: " + too_much(str(resources.gpus), str(policy.max_gpus),
                                                         "--max-gpus-per-job", MAX_GPUS, "fewer"))  # fmt: skip
    if policy.max_memory and quantity_value(resources.memory) > quantity_value(policy.max_memory):
        found.append("spec.resources.memory: " + too_much(resources.memory, policy.max_memory,
                                                           "--max-memory-per-job", MAX_MEMORY, "less"))  # fmt: skip
    if resources.gpu_resource != CLUSTER_GPU:
        check("spec.resources.gpuResource", "GPU resource", resources.gpu_resource, policy.gpu_resources,
              GPU_RESOURCES)  # fmt: skip
    if resources.priority_class_name:
        check("spec.resources.priorityClassName", "priority class", resources.priority_class_name,
              policy.priority_classes, PRIORITY_CLASSES)  # fmt: skip
    if resources.placement_profile and resources.placement_profile not in policy.profiles:
        found.append(f"spec.resources.placementProfile: {unknown_profile(resources.placement_profile, names)}")
    if not policy.free_placement:
        found += [f"spec.resources.{wire}: {not_free(names)}" for wire, name in FREE_FIELDS
                  if getattr(resources, name)]  # fmt: skip
    for field, uri, writes in claim_uses(spec):
        claim = claim_of(uri)
        if claim is None:
            continue
        check(field, "claim", claim, policy.claims, CLAIMS)
        if writes:
            check(field, "writable claim", claim, policy.writable_claims, WRITABLE_CLAIMS)
    return found


# --- the admission policy ---------------------------------------------------------------------


def _optional(path: str) -> str:
    """CEL: ``[object.spec.<path>]`` where it is set (each parent checked), else ``[]``."""
    parts = path.split(".")
    checks = " && ".join(f"has(object.spec.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))
    return f"({checks} ? [object.spec.{path}] : [])"


def _concepts(field: str) -> str:
    return (
        "(has(object.spec.dataset.concepts) ? "
        f"object.spec.dataset.concepts.filter(c, has(c.{field})).map(c, c.{field}) : [])"
    )


def _uris(*, writes: bool) -> str:
    """CEL: the URIs ``claim_uses`` lists, those the trainer writes to or all of them."""
    written = [_optional("dataset.classImages"), _optional("output.uri"), _concepts("classImages")]
    read = [
        _optional("baseModel.uri"),
        _optional("baseModel.vaeUri"),
        _optional("baseModel.componentsUri"),
        _optional("dataset.instanceImages"),
        _optional("evaluation.clipModel"),
        _optional("evaluation.dinoModel"),
        _concepts("images"),
    ]
    return " + ".join(written if writes else written + read)


def _allowed(key: str) -> str:
    """CEL: the params ConfigMap's list under ``key`` (as ``split`` reads it)."""
    listed = f"params.data['{key}'].split(',').map(p, p.trim()).filter(p, p != '')"
    return f"has(params.data) && '{key}' in params.data ? {listed} : []"


def _refusal(what: str, name: str, key: str, field: str = "") -> str:
    """CEL for ``refusal``'s sentence (``name`` a CEL string expression), after ``field: ``."""
    return (
        f"'{field + ': ' if field else ''}{what} ' + {name} + ' is not allowed on this cluster: it must start "
        f"with one of ' + variables.{key}.join(',') + ' (the chart\\'s jobPolicy.{key}; ask the platform team)'"
    )


def validations() -> list[dict[str, str]]:
    image, secret = "object.spec.image", "object.spec.baseModel.credentialsSecret"
    priority = "object.spec.resources.priorityClassName"
    prefixed = [
        (
            IMAGES,
            f"{image} == '' || variables.{IMAGES}.exists(p, {image}.startsWith(p))",
            _refusal("image", image, IMAGES, "spec.image"),
        ),
        (
            SECRETS,
            f"!has({secret}) || {secret} == '' || variables.{SECRETS}.exists(p, {secret}.startsWith(p))",
            _refusal("Secret", secret, SECRETS, "spec.baseModel.credentialsSecret"),
        ),
        (
            PRIORITY_CLASSES,
            f"{_optional('resources.priorityClassName')}.all(n, n == '' || "
            f"variables.{PRIORITY_CLASSES}.exists(p, n.startsWith(p)))",
            _refusal("priority class", priority, PRIORITY_CLASSES, "spec.resources.priorityClassName"),
        ),
        (
            GPU_RESOURCES,
            f"{_optional('resources.gpuResource')}.all(n, n == '{CLUSTER_GPU}' || "
            f"variables.{GPU_RESOURCES}.exists(p, n.startsWith(p)))",
            _refusal("GPU resource", "object.spec.resources.gpuResource", GPU_RESOURCES, "spec.resources.gpuResource"),
        ),
    ]
    for key, claims, what in ((CLAIMS, "namedClaims", "claim"), (WRITABLE_CLAIMS, "writtenClaims", "writable claim")):
        bad = f"variables.{claims}.filter(c, !variables.{key}.exists(p, c.startsWith(p)))"
        prefixed.append((key, f"size({bad}) == 0", _refusal(what, f"{bad}.join(', ')", key)))
    rules = [(f"size(variables.{key}) == 0 || ({ok})", message) for key, ok, message in prefixed]
    # The sentences of too_much.
    gpus, memory = "object.spec.resources.gpus", "object.spec.resources.memory"
    rules += [
        (
            f"variables.{MAX_GPUS} == 0 || {_optional('resources.gpus')}.all(n, n <= variables.{MAX_GPUS})",
            f"'spec.resources.gpus: ' + string({gpus}) + ' is more than a job may ask for on this cluster (at most ' "
            f"+ string(variables.{MAX_GPUS}) + ': the operator\\'s --max-gpus-per-job, the chart\\'s "
            f"jobLimits.{MAX_GPUS}); ask for fewer'",
        ),
        (
            f"variables.{MAX_MEMORY} == '' || {_optional('resources.memory')}.all(m, !isQuantity(m) || "
            f"quantity(m).compareTo(quantity(variables.{MAX_MEMORY})) <= 0)",
            f"'spec.resources.memory: ' + {memory} + ' is more than a job may ask for on this cluster (at most ' "
            f"+ variables.{MAX_MEMORY} + ': the operator\\'s --max-memory-per-job, the chart\\'s "
            f"jobLimits.{MAX_MEMORY}); ask for less'",
        ),
    ]
    # The sentences of unknown_profile and not_free.
    rules.append(
        (
            f"{_optional('resources.placementProfile')}.all(n, n == '' || n in variables.{PROFILES})",
            "'spec.resources.placementProfile: placement profile ' + object.spec.resources.placementProfile + "
            "' is not defined on this cluster: it must be one of ' + variables.profileNames + "
            f"' (the chart\\'s jobPolicy.{PROFILES}; ask the platform team)'",
        )
    )
    rules += [
        (
            f"!variables.profilesOnly || {_optional('resources.' + wire)}.all(v, size(v) == 0)",
            f"'spec.resources.{wire}: free placement is not allowed on this cluster: pods are placed by a profile, "
            "spec.resources.placementProfile, one of ' + variables.profileNames + "
            f"' (the chart\\'s jobPolicy.{FREE_PLACEMENT}; ask the platform team)'",
        )
        for wire, _ in FREE_FIELDS
    ]  # fmt: skip
    return [{"expression": rule, "messageExpression": message, "reason": REASON} for rule, message in rules]


def _claims(uris: str) -> str:
    return f"({uris}).filter(u, u.startsWith('pvc://')).map(u, u.substring(6).split('/')[0])"


def build_policy() -> dict[str, Any]:
    variables = [{"name": key, "expression": _allowed(key)} for key in (*PREFIX_LISTS, PROFILES)]
    param = "params.data['{}'].trim()"
    variables += [
        {
            "name": MAX_GPUS,
            "expression": f"has(params.data) && '{MAX_GPUS}' in params.data && {param.format(MAX_GPUS)}"
            f".matches('^[0-9]+$') ? int({param.format(MAX_GPUS)}) : 0",
        },
        {
            "name": MAX_MEMORY,
            "expression": f"has(params.data) && '{MAX_MEMORY}' in params.data && isQuantity({param.format(MAX_MEMORY)})"
            f" ? {param.format(MAX_MEMORY)} : ''",
        },
        {
            "name": "profileNames",
            "expression": f"size(variables.{PROFILES}) == 0 ? '(none defined)' : variables.{PROFILES}.join(',')",
        },
        {
            "name": "profilesOnly",
            "expression": f"has(params.data) && '{FREE_PLACEMENT}' in params.data && "
            f"params.data['{FREE_PLACEMENT}'].trim() == 'false'",
        },
        {"name": "namedClaims", "expression": _claims(_uris(writes=False))},
        {"name": "writtenClaims", "expression": _claims(_uris(writes=True))},
    ]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "spec": {
            "failurePolicy": "Fail",
            # The chart's ConfigMap, named by the binding (each list comma-separated under its key).
            "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": [GROUP], "apiVersions": ["*"], "operations": ["CREATE"], "resources": [PLURAL]}
                ]
            },
            "variables": variables,
            "validations": validations(),
        },
    }


def render_policy() -> str:
    return HEADER + yaml.safe_dump(build_policy(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    return generate(render_policy(), argv if argv is not None else sys.argv[1:], POLICY_FILE)


if __name__ == "__main__":
    sys.exit(main())
