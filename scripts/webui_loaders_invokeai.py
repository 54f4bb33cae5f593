"""InvokeAI's side of ``scripts/webui_loaders.py``: run in InvokeAI's own environment (it imports
InvokeAI, its torch and its diffusers, and nothing of this project).

``python webui_loaders_invokeai.py FILES.json RESULTS.json``: FILES.json lists the exported files
(path, kind, layout, what InvokeAI should make of it) and the folder of the pipeline's config
files; RESULTS.json gets, for each file, what InvokeAI identified it as, what its loader
loaded, and the problems found.

For each file, what InvokeAI itself does with a model:

- **probe**: ``ModelConfigFactory.from_model_on_disk``, which InvokeAI's model installer calls
  when a model is added (by path, URL or scan): the model's type, base, format, variant and
  prediction type, from its keys and shapes;
- **load**: the model manager's loader (``ModelLoadService.load_model``) on the probed config,
  each submodel of a main model (UNet, text encoder, VAE, tokenizer, scheduler).  A single file
  goes through diffusers' ``from_single_file``, which takes the pipeline's config files from the
  hub's cache: offline, they are put there from this project's shipped configs, under the
  repository name diffusers asks for;
- **apply** (LoRA): the LoRA loader's patch applied with ``LayerPatcher.apply_smart_model_patches``
  to the loaded UNet (``lora_unet_``) and text encoder (``lora_te_``), as InvokeAI's
  denoise and prompt nodes do; every layer of the file must reach a module, and each patched
  module's output must change by exactly ``x (up down)^T alpha/rank`` read from the file; then
  the patched text encoder and UNet run once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch


def log(message: str) -> None:
    print(f"[invokeai] {message}", flush=True)


class Collect(logging.Handler):
    """InvokeAI's warnings (a LoRA layer that finds no module is only a warning there)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


WARNINGS = Collect()


def describe(config: Any) -> dict[str, str]:
    out = {"config": type(config).__name__}
    for field in ("type", "base", "format", "variant", "prediction_type"):
        value = getattr(config, field, None)
        if value is not None:
            out[field] = str(getattr(value, "value", value))
    return out


def probe(path: Path, app_config: Any) -> tuple[Any, dict[str, Any]]:
    from invokeai.backend.model_manager.configs.factory import ModelConfigFactory

    result = ModelConfigFactory.from_model_on_disk(
        mod=path, hash_algo=app_config.hashing_algorithm, allow_unknown=app_config.allow_unknown_models
    )
    reasons = {
        name: f"{type(detail).__name__}: {detail}"
        for name, detail in result.details.items()
        if not hasattr(detail, "type") and ("SD1" in name or name.startswith("Unknown"))
    }
    return result.config, reasons


def load_service(app_config: Any) -> Any:
    """A model loader with a RAM cache of its own, as InvokeAI's model manager builds it."""
    from invokeai.app.services.model_load.model_load_default import ModelLoadService
    from invokeai.backend.model_manager.load.model_cache.model_cache import ModelCache
    from invokeai.backend.util.devices import TorchDevice
    from invokeai.backend.util.logging import InvokeAILogger

    cache = ModelCache(
        execution_device_working_mem_gb=app_config.device_working_mem_gb,
        enable_partial_loading=app_config.enable_partial_loading,
        keep_ram_copy_of_weights=app_config.keep_ram_copy_of_weights,
        max_ram_cache_size_gb=app_config.max_cache_ram_gb,
        max_vram_cache_size_gb=app_config.max_cache_vram_gb,
        execution_device=TorchDevice.choose_torch_device(),
        storage_device="cpu",
        logger=InvokeAILogger.get_logger("ModelCache"),
        shared_cpu_weights=None,
    )
    return ModelLoadService(app_config=app_config, ram_cache=cache)


def digests(model: torch.nn.Module) -> dict[str, str]:
    """Each tensor's content (as the fp16 it was exported in) by its diffusers name, the text
    encoder's without ``text_model.``: as ``scripts/webui_loaders.py`` records the exported ones."""
    out = {}
    for key, tensor in model.state_dict().items():
        data = tensor.detach().to(torch.float16) if tensor.is_floating_point() else tensor.detach()
        name = key.removeprefix("text_model.")
        out[name] = hashlib.blake2b(data.contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()
    return out


SAME_WEIGHTS = "every tensor of the loaded UNet, text encoder and VAE equals the exported one"
MAIN_PARTS = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel", "vae": "AutoencoderKL"}


def file_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    return keys


def load_main(service: Any, config: Any) -> tuple[dict[str, Any], dict[str, dict[str, str]], list[str], list[str]]:
    """Every submodel through InvokeAI's loader: the loaded models, their tensors' digests,
    notes and problems.  For a folder, each weight file's names are compared with the names of
    the model that was loaded from it (a loader may skip a file's tensors with no more than a
    printed report and leave the model as initialised)."""
    from invokeai.backend.model_manager.taxonomy import SubModelType

    loaded: dict[str, Any] = {}
    sums: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    problems: list[str] = []
    for part in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
        started = time.monotonic()
        model = service.load_model(config, SubModelType(part))
        loaded[part] = model
        inner = model.model
        if part in MAIN_PARTS:
            if type(inner).__name__ != MAIN_PARTS[part]:
                raise TypeError(f"{part} loaded as {type(inner).__name__}, not {MAIN_PARTS[part]}")
            sums[part] = digests(inner)
            count = sum(p.numel() for p in inner.parameters())
            dtype = next(inner.parameters()).dtype
            notes.append(f"loaded {part}: {type(inner).__name__}, {count / 1e6:.1f}M parameters, {dtype}")
            folder = Path(config.path) / part
            if folder.is_dir():
                names, wanted = file_keys(folder), set(inner.state_dict())
                if unread := sorted(names - wanted):
                    problems.append(
                        f"{part}: {len(unread)} of the {len(names)} tensors in {part}/ are not read "
                        f"(the file has {unread[:2]}, the model wants {sorted(wanted - names)[:2]}; "
                        f"{len(wanted - names)} of the model's {len(wanted)} are left as initialised)"
                    )
        else:
            notes.append(f"loaded {part}: {type(inner).__name__}")
        log(f"  {part} loaded ({time.monotonic() - started:.0f} s)")
    return loaded, sums, notes, problems


def compare(exported: dict[str, dict[str, str]], loaded: dict[str, dict[str, str]]) -> list[str]:
    """What InvokeAI loaded against what was exported, tensor by tensor."""
    problems = []
    for part, sums in exported.items():
        other = loaded.get(part, {})
        missing, extra = sorted(set(sums) - set(other)), sorted(set(other) - set(sums))
        differ = sorted(k for k in set(sums) & set(other) if sums[k] != other[k])
        if missing or extra or differ:
            problems.append(
                f"{part}: InvokeAI loaded other weights than were exported: {len(differ)} of {len(sums)} tensors "
                f"differ {differ[:3]}, {len(missing)} missing {missing[:3]}, {len(extra)} extra {extra[:3]}"
            )
    return problems


# --- LoRA -----------------------------------------------------------------------------------------


def lora_layers(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's layers in kohya's layout: ``{layer: {"lora_down.weight", "lora_up.weight", "alpha"}}``."""
    from safetensors.torch import load_file

    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        layer, _, leaf = key.partition(".")
        layers.setdefault(layer, {})[leaf] = tensor
    return layers


def check_patched_modules(
    model: torch.nn.Module,
    prefix: str,
    layers: dict[str, dict[str, torch.Tensor]],
    deltas: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Every layer of the file patches one module, and each module's output moves by the
    file's ``up @ down * alpha / rank`` (LoRA), or by the change of weight ``deltas`` gives
    (the other kinds: what the LyCORIS package's modules make of the file)."""
    import torch.nn.functional as F  # noqa: N812

    problems = []
    wanted = {key[len(prefix) :]: value for key, value in layers.items() if key.startswith(prefix)}
    by_flat_name = {name.replace(".", "_"): (name, module) for name, module in model.named_modules() if name}
    patched = {name for name, module in model.named_modules() if getattr(module, "get_num_patches", lambda: 0)() > 0}
    reached = {by_flat_name[flat][0] for flat in wanted if flat in by_flat_name}
    if missing := sorted(prefix + flat for flat in wanted if flat not in by_flat_name):
        problems.append(f"{len(missing)} layers name no module of the model: {missing[:3]}")
    if unpatched := sorted(reached - patched):
        problems.append(f"{len(unpatched)} modules named by the file were not patched: {unpatched[:3]}")
    if others := sorted(patched - reached):
        problems.append(f"{len(others)} modules patched that the file does not name: {others[:3]}")
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for flat, tensors in wanted.items():
        if flat not in by_flat_name:
            continue
        _, module = by_flat_name[flat]
        weight = module.weight
        if deltas is not None:
            delta = deltas[prefix + flat].float()
        else:
            down, up = tensors["lora_down.weight"].float(), tensors["lora_up.weight"].float()
            rank = down.shape[0]
            scale = float(tensors["alpha"]) / rank if "alpha" in tensors else 1.0
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
        if weight.dim() == 2:
            x = torch.randn(2, weight.shape[1], generator=generator).to(weight.dtype)
            base, expected = F.linear(x, weight, module.bias), F.linear(x, delta.to(weight.dtype))
        else:
            x = torch.randn(1, weight.shape[1], 8, 8, generator=generator).to(weight.dtype)
            # The module's own stride and padding (a LoCon's 3x3 convolutions and downsamplers).
            geometry = {"stride": module.stride, "padding": module.padding}
            base = F.conv2d(x, weight, module.bias, **geometry)
            expected = F.conv2d(x, delta.to(weight.dtype), **geometry)
        with torch.no_grad():
            got = module(x) - base
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
        worst = max(worst, error)
    if worst > 1e-3:
        expected_what = "LyCORIS' modules" if deltas is not None else "up @ down * alpha/rank"
        problems.append(f"a patched module's output moved by other than {expected_what} (relative error {worst:.1e})")
    return problems


def run_models(main: dict[str, Any], patches: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder and one UNet step, under InvokeAI's patcher as its nodes apply it."""
    from invokeai.backend.patches.layer_patcher import LayerPatcher

    tokenizer = main["tokenizer"].model
    ids = tokenizer("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with (
        main["text_encoder"].model_on_device() as (te_weights, text_encoder),
        LayerPatcher.apply_smart_model_patches(
            model=text_encoder,
            patches=[(p, 1.0) for p in patches],
            prefix="lora_te_",
            dtype=text_encoder.dtype,
            cached_weights=te_weights,
        ),
        torch.no_grad(),
    ):
        embeddings = text_encoder(ids)[0]
    with (
        main["unet"].model_on_device() as (unet_weights, unet),
        LayerPatcher.apply_smart_model_patches(
            model=unet,
            patches=[(p, 1.0) for p in patches],
            prefix="lora_unet_",
            dtype=unet.dtype,
            cached_weights=unet_weights,
        ),
        torch.no_grad(),
    ):
        sample = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0), dtype=unet.dtype)
        out = unet(sample, torch.tensor([500]), encoder_hidden_states=embeddings.to(unet.dtype)).sample
    return embeddings, out


def apply_lora(
    main: dict[str, Any], service: Any, config: Any, path: Path, deltas: Path | None = None
) -> tuple[list[str], list[str]]:
    from invokeai.backend.patches.layer_patcher import LayerPatcher
    from invokeai.backend.patches.model_patch_raw import ModelPatchRaw

    notes: list[str] = []
    problems: list[str] = []
    patch = service.load_model(config).model
    if not isinstance(patch, ModelPatchRaw):
        return notes, [f"the LoRA loader gave a {type(patch).__name__}, not a ModelPatchRaw"]
    layers = lora_layers(path)
    from safetensors.torch import load_file

    expected = load_file(str(deltas)) if deltas is not None else None
    unet_layers = sum(1 for k in patch.layers if k.startswith("lora_unet_"))
    te_layers = sum(1 for k in patch.layers if k.startswith("lora_te_"))
    notes.append(f"loaded: {len(patch.layers)} layers ({unet_layers} UNet, {te_layers} text encoder)")
    if unet_layers + te_layers != len(patch.layers):
        problems.append(f"{len(patch.layers) - unet_layers - te_layers} layers are for neither model")
    WARNINGS.messages.clear()
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        with (
            main[part].model_on_device() as (weights, model),
            LayerPatcher.apply_smart_model_patches(
                model=model, patches=[(patch, 1.0)], prefix=prefix, dtype=model.dtype, cached_weights=weights
            ),
        ):
            problems += [f"{part}: {p}" for p in check_patched_modules(model, prefix, layers, expected)]
    problems += [f"InvokeAI warned: {m}" for m in WARNINGS.messages if "LoRA" in m]
    moved_by = "the LyCORIS package's modules" if expected is not None else "up @ down * alpha/rank"
    notes.append(
        f"applied with InvokeAI's layer patcher: every layer reached its module, outputs moved as by {moved_by}"
        if not problems
        else "applied with InvokeAI's layer patcher"
    )
    base_embeddings, base_out = main["_base_outputs"]
    embeddings, out = run_models(main, [patch])
    if not torch.isfinite(out).all():
        problems.append("the patched UNet's output is not finite")
    moved_te = float((embeddings - base_embeddings).abs().max())
    moved_unet = float((out - base_out).abs().max())
    notes.append(f"ran the patched text encoder and UNet: output moved by {moved_te:.3g} and {moved_unet:.3g}")
    if moved_unet == 0 or (te_layers and moved_te == 0):
        problems.append("the LoRA did not change the outputs")
    return notes, problems


def check_embedding(service: Any, config: Any, reference: Path) -> tuple[list[str], list[str]]:
    """InvokeAI's loader reads the embedding to the very vectors exported (the diffusers-layout
    file beside it holds them too)."""
    from safetensors.torch import load_file

    raw = service.load_model(config).model
    expected = next(iter(load_file(str(reference)).values())).float()
    got = raw.embedding.float()
    notes = [f"loaded: {type(raw).__name__}, {got.shape[0]} vector(s) of width {got.shape[-1]}"]
    if got.shape != expected.shape or not torch.equal(got, expected):
        return notes, [f"loaded vectors {tuple(got.shape)} differ from the exported {tuple(expected.shape)}"]
    return [*notes, "the very vectors exported"], []


# --- driver ---------------------------------------------------------------------------------------


def hub_cache_stand_in(configs: Path) -> None:
    """Put the pipeline's config files where diffusers' ``from_single_file`` looks for them."""
    import os

    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS["v1"]["pretrained_model_name_or_path"]
    hub = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    revision = hashlib.sha1(repo.encode()).hexdigest()
    shutil.copytree(configs, hub / "snapshots" / revision, dirs_exist_ok=True)
    (hub / "refs").mkdir(parents=True, exist_ok=True)
    (hub / "refs" / "main").write_text(revision)
    log(f"hub cache: {repo}'s config files, from the shipped configs")


def reference_layouts(results: list[dict[str, Any]], app_config: Any) -> list[dict[str, Any]]:
    """Whether a refused diffusers-layout LoRA is refused for its layout and not for something of
    ours: the same adapters in the layout diffusers' own ``train_dreambooth_lora.py`` writes
    (``convert_state_dict_to_diffusers``: ``lora.down``/``lora.up`` names), made with InvokeAI's
    diffusers, through the same probe."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file, save_file

    ours = next((r for r in results if r.get("unsupported") and Path(r["path"]).is_file()), None)
    if ours is None:
        return []
    folder = Path(ours["path"]).parent.with_name("reference-diffusers-script")
    folder.mkdir(exist_ok=True)
    # The script's targets: the attention projections, which its conversion renames.
    attention = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")
    state = convert_state_dict_to_diffusers(
        {k: v for k, v in load_file(ours["path"]).items() if any(a in k for a in attention)}
    )
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    config, reasons = probe(folder, app_config)
    identified = describe(config) if config is not None and type(config).__name__ != "Unknown_Config" else {}
    first = next((r for n, r in reasons.items() if "LoRA_Diffusers_SD1" in n), None)
    note = (
        f"InvokeAI identifies it: {identified}"
        if identified
        else f"not identified either ({first}): the refusal is of the layout, not of our file"
    )
    log(f"probed the reference layout: {identified or 'not identified'}")
    return [
        {
            "path": str(folder),
            "kind": "reference",
            "layout": "reference, not ours: the same adapters as diffusers' train_dreambooth_lora.py writes them",
            "identified": identified,
            "notes": [f"keys like {next(iter(state))}", note],
            "problems": [],
        }
    ]


def matches(identified: dict[str, str], expect: dict[str, str]) -> bool:
    return all(identified.get(k) == v for k, v in expect.items())


def main() -> int:
    import importlib.metadata

    files_json, results_json = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(files_json.read_text())
    from invokeai.app.services.config.config_default import get_config
    from invokeai.backend.util.devices import TorchDevice

    app_config = get_config()
    logging.getLogger("LayerPatcher").addHandler(WARNINGS)
    versions = {p: importlib.metadata.version(p) for p in ("invokeai", "torch", "diffusers", "transformers")}
    device = TorchDevice.choose_torch_device()
    log(", ".join(f"{k} {v}" for k, v in versions.items()) + f"; device: {device}")
    hub_cache_stand_in(Path(spec["hub_configs"]))

    results: list[dict[str, Any]] = []
    configs: dict[str, Any] = {}
    for entry in spec["files"]:
        path = Path(entry["path"])
        started = time.monotonic()
        result: dict[str, Any] = {**entry, "notes": [], "problems": []}
        try:
            config, reasons = probe(path, app_config)
        except Exception as exc:
            config, reasons = None, {"probe": f"{type(exc).__name__}: {exc}"}
        if config is not None and type(config).__name__ != "Unknown_Config":
            result["identified"] = describe(config)
            configs[entry["path"]] = config
        else:
            result["identified"] = {}
            result["reasons"] = reasons
        expect, unsupported = entry.get("expect"), entry.get("unsupported")
        if expect is not None and not matches(result["identified"], expect):
            result["problems"].append(f"expected {expect}; InvokeAI's reasons: {reasons}")
        if unsupported is not None:
            if result["identified"]:
                result["notes"].append(f"NEW: InvokeAI now identifies this layout ({unsupported} no longer holds)")
            else:
                kind = "TI_File" if entry["kind"] == "embedding" else "LoRA"
                first = next((r for n, r in reasons.items() if kind in n and "SD1" in n and " not a " not in r), None)
                result["notes"].append(f"not identified, as known: {unsupported} ({first})")
        log(f"probed {path.name}: {result['identified'] or 'not identified'} ({time.monotonic() - started:.0f} s)")
        results.append(result)

    results += reference_layouts(results, app_config)

    def by_layout(text: str) -> dict[str, Any] | None:
        return next((r for r in results if r["layout"] == text), None)

    folder, single = by_layout("diffusers folder"), by_layout("single file (original SD layout)")
    main_models: dict[str, Any] | None = None
    service: Any = None
    # The diffusers folder first, its models released before the single file's are loaded.
    if folder is not None and folder["path"] in configs:
        log("loading the diffusers folder with InvokeAI's loader")
        try:
            loaded, sums, notes, problems = load_main(load_service(app_config), configs[folder["path"]])
            folder["notes"] += notes
            folder["problems"] += problems
            folder["problems"] += compare(spec["weights"], sums)
            if not folder["problems"]:
                folder["notes"].append(SAME_WEIGHTS)
            del loaded
        except Exception:
            folder["problems"].append(f"InvokeAI's loader failed: {traceback.format_exc(limit=4)}")
    if single is not None and single["path"] in configs:
        log("loading the single file with InvokeAI's loader")
        service = load_service(app_config)
        try:
            main_models, sums, notes, problems = load_main(service, configs[single["path"]])
            single["notes"] += notes
            single["problems"] += problems
            single["problems"] += compare(spec["weights"], sums)
            if not single["problems"]:
                single["notes"].append(SAME_WEIGHTS)
            main_models["_base_outputs"] = run_models(main_models, [])
            single["notes"].append("ran its text encoder and UNet once")
        except Exception:
            single["problems"].append(f"InvokeAI's loader failed: {traceback.format_exc(limit=4)}")
            main_models = None
    for result in results:
        if result["kind"] != "lora" or result["path"] not in configs:
            continue
        if main_models is None:
            result["problems"].append("not applied: the single file did not load")
            continue
        log(f"applying {Path(result['path']).name} with InvokeAI's LoRA loader and layer patcher")
        try:
            deltas = Path(result["deltas"]) if result.get("deltas") else None
            notes, problems = apply_lora(main_models, service, configs[result["path"]], Path(result["path"]), deltas)
            known = result.get("known_wrong")
            if known is not None:
                otherwise = [p for p in problems if "moved by other than" in p]
                if otherwise and len(otherwise) == len(problems):
                    notes.append(f"applied otherwise than LyCORIS, as known: {known} ({otherwise[0]})")
                    problems = []
                elif not problems:
                    notes.append(f"NEW: InvokeAI now applies this file as LyCORIS does ({known} no longer holds)")
            result["notes"] += notes
            result["problems"] += problems
        except Exception:
            result["problems"].append(f"InvokeAI's LoRA loader failed: {traceback.format_exc(limit=4)}")
    for result in results:
        if result["kind"] != "embedding" or result["path"] not in configs or not result.get("vectors"):
            continue
        log(f"loading {Path(result['path']).name} with InvokeAI's loader")
        try:
            notes, problems = check_embedding(
                service or load_service(app_config), configs[result["path"]], Path(result["vectors"])
            )
            result["notes"] += notes
            result["problems"] += problems
        except Exception:
            result["problems"].append(f"InvokeAI's loader failed: {traceback.format_exc(limit=4)}")
    for result in results:
        result["ok"] = not result["problems"]
        result["versions"] = versions
    results_json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
