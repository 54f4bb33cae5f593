"""``python -m finetune_operator run ...``"""

import sys

from finetune_operator.cli import main

sys.exit(main())
