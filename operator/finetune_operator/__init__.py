"""finetune-operator: DreamBooth and LoRA fine-tuning of image models (SD 1.x/2.x, SDXL, Flux.1)
as a Kubernetes custom resource.

Importing this package is cheap and pulls in neither kopf nor torch: the API
models under ``finetune_api`` are shared with the trainer.
"""

__version__ = "0.1.0"
