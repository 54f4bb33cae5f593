"""finetune-operator: Stable Diffusion DreamBooth fine-tuning as a Kubernetes custom resource.

Importing this package is cheap and pulls in neither kopf nor torch: the API
models under ``finetune_api`` are shared with the trainer.
"""

__version__ = "0.1.0"
