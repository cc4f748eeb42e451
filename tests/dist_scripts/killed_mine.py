"""`python -m tests.dist_scripts.killed_mine [overrides]`: `python -m trainer.mine`, killed by
SIGKILL (no cleanup, no exception handler runs) in the middle of a block: after the block's part
file is written, before the manifest that would count it done. KILL_AT_BLOCK (default 2) is the
block it dies in."""

from __future__ import annotations

import os
import signal

from trainer.mining import parts as mine_parts

_save_manifest = mine_parts.Parts.save_manifest


def _dying_save_manifest(self) -> None:
    if len(self.done) == int(os.environ.get("KILL_AT_BLOCK", "2")) + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _save_manifest(self)


mine_parts.Parts.save_manifest = _dying_save_manifest

if __name__ == "__main__":
    from trainer.tools.mine import main

    main()
