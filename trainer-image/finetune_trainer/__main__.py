"""``python -m finetune_trainer run JOB.yaml`` (and ``accelerate launch -m finetune_trainer``)."""

import sys

from finetune_trainer.cli import main

sys.exit(main())
