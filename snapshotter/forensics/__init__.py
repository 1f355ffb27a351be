"""Forensics over quarantine bundles: choosing records (:mod:`.select`), the
field-level diff of a record's snapshot and quarantined live versions
(:mod:`.diff`), exports for outside tools (:mod:`.export`), and the terminal tables
that list them (:mod:`.table`).  Writing chosen
records back to a live store is the restore's (:func:`snapshotter.restore.reapply`).

The names below are the ones the CLI and the report use.
"""
from .diff import changed_fields, diff_values, preview, record_diff
from .export import EXPORT_BATCH, EXPORT_COLUMNS, EXPORT_FORMATS, atomic_output, csv_cell, export_records, export_row
from . import table
from .select import Located, RecordFilter, count_post_failure, locate, parse_key, select_records

__all__ = ["EXPORT_BATCH", "EXPORT_COLUMNS", "EXPORT_FORMATS", "Located", "RecordFilter", "atomic_output",
           "changed_fields", "count_post_failure", "csv_cell", "diff_values", "export_records", "export_row",
           "locate", "parse_key", "preview", "record_diff", "select_records", "table"]
