"""Core: what every stage shares and nothing stage-specific.

Modules: :mod:`~hemexp.core.config` (load, schema validation in :mod:`hemexp.core.schema`, cross-key
rules, hashes, variants), :mod:`~hemexp.core.layout` (every result path: the one owner),
:mod:`~hemexp.core.clinical` (the seven clinical variables, their ranges, the expansion rule),
:mod:`~hemexp.core.errors` (per-patient input errors, manifest errors, the failure table),
:mod:`~hemexp.core.deid` (de-identification: shareable paths and text, the DICOM whitelist),
:mod:`~hemexp.core.files` (atomic writes, JSON, figures), :mod:`~hemexp.core.runtime` (logging,
seeding), :mod:`~hemexp.core.commands` (argument helpers of every stage's ``cli.py``) and
:mod:`~hemexp.core.cli` (``hemexp validate-config``). Core imports no other ``hemexp`` package.
"""
