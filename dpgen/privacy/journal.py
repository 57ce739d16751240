"""The spend journal: each DP-SGD step's charge is on disk before that step's noise is drawn.

privacy.json states ε, which takes the accountant a while, so it is written only every
``privacy.log_every_n_steps`` and before released outputs; checkpoints come rarer still. Without
a per-step record, the steps between the last of those and a crash would be re-run on resume
with fresh noise and charged once, and a crash that an operator can cause after seeing something
from those steps (the un-noised loss, with ``privacy.log_train_loss=true``) would make a resume a
free second draw. The journal closes that: one appended line per step, the ledger's state (less
its plan) after the charge, flushed and fsynced before the noise (about 0.3 ms on a local disk).
A resume keeps whichever record spent most: the journal, privacy.json or the checkpoint.

Each record is the whole ledger, so only the last one is ever read. Past ``COMPACT_AT_BYTES``
the file is replaced, atomically, by its last record: a run of a million steps would otherwise
leave a 300 MB journal, read whole on every resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpgen.io import atomic_write, fsync_directory
from dpgen.privacy.ledger import PrivacyLedger

JOURNAL = "privacy-journal.jsonl"
COMPACT_AT_BYTES = 1 << 20  # about 3,000 records of one stage; a rewrite that often costs nothing


def append_spend(path: str | os.PathLike, ledger: PrivacyLedger) -> None:
    """Append the ledger's state, less its plan, as one line and make it durable before returning.
    The header (ε target, δ, N, accountant) goes too, so a resume under other privacy settings
    refuses the journal as it refuses a checkpoint."""
    state = ledger.state_dict()
    del state["planned"]
    # The newline goes first: a record cut short by a crash then ends at the next one's start
    # instead of swallowing it.
    record = "\n" + json.dumps(state, allow_nan=False)
    path = Path(path)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        f.write(record)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    if size > COMPACT_AT_BYTES:
        # Only after the append is durable: a crash during the rewrite leaves the old file or the
        # new one, and both end with this record.
        atomic_write(path, lambda out: out.write(record.encode("utf-8")))
    elif new:  # the file's directory entry must survive a power loss too
        fsync_directory(path.parent)


def read_spend(path: str | os.PathLike) -> dict | None:
    """The journal's last complete record (a ``load_state_dict`` state without a plan), or None.

    A record cut short by a crash is skipped: its write had not returned, so its step drew no noise."""
    path = Path(path)
    if not path.exists():
        return None
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None
