"""Restore: compare live stores with a snapshot, quarantine what a restore would
overwrite, apply, verify; and reapply quarantined records.

* :mod:`.resolve`: which snapshot, which sources and streams (and sessions);
* :mod:`.plan`: the difference of snapshot and live, one merge of key-ordered streams,
  written to the quarantine as it goes;
* :mod:`.apply`: the operation in its order, the writes, transactions and each
  source's status;
* :mod:`.verify`: whether the live store holds what is expected, before writing, after
  writing, and for reapply;
* :mod:`.reapply`: writing chosen quarantined records back.

The names below are the ones the CLI and the Python API (docs/python-api.md) use.
"""
from .apply import APPLY_BATCH, RestoreResult, restore
from .plan import StreamPlan, plan_stream
from .reapply import changed_since_restore, reapply
from .resolve import (Selection, Target, check_objects, codec_time, missing_sources, not_configured,
                      refuse_missing_sources, resolve_snapshot, select_targets)
from .verify import VERIFY_BATCH

__all__ = ["APPLY_BATCH", "VERIFY_BATCH", "RestoreResult", "Selection", "StreamPlan", "Target", "changed_since_restore",
           "check_objects", "codec_time", "missing_sources", "not_configured", "plan_stream", "reapply",
           "refuse_missing_sources", "resolve_snapshot", "restore", "select_targets"]
