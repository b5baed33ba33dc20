"""The resolved config file that every workflow job reads.

Snakemake merges ``configfile`` with ``--configfile`` and ``--config`` overrides in memory; jobs are
separate processes (possibly on other nodes), so the merged result is written once per workflow start
under ``<results>/config/resolved.yaml``. It is rewritten only when its content changes, so its mtime
never triggers reruns by itself; rules declare the config sections they depend on via ``params``.
"""

from __future__ import annotations

from typing import Any

import yaml

from hemexp.core.files import atomic_path
from hemexp.core.layout import Layout


def write_resolved_config(cfg: dict[str, Any]) -> str:
    """Write the merged config if it changed; return its path (for ``--config`` in rule commands)."""
    path = Layout.of(cfg).resolved_config
    text = yaml.safe_dump(cfg, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return str(path)
