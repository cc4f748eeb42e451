"""`python -m trainer` under an address-space limit (RLIMIT_AS): the process may grow by MARGIN_MB
past its size once torch, transformers and the trainer are imported, and an allocation beyond
that fails as a real out-of-memory error does ("can't allocate memory").

    python tests/memory_scripts/limited_trainer.py MARGIN_MB [hydra overrides ...]
"""

import resource
import sys

import datasets  # noqa: F401  (imported before the limit: their size is not what is measured)
import torch  # noqa: F401
import transformers  # noqa: F401

from trainer import __main__ as app
from trainer.core.memory import _proc_status

margin = int(sys.argv.pop(1)) << 20
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (_proc_status("VmSize") + margin, hard))
app.main()
