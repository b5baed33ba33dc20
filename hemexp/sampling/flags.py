"""Expansion-flag sources for sampling: where the flag of each sample comes from.

The diffusion model of an ``*e`` variant needs the follow-up expansion state as an input. At
inference that state is unknown, so ``sampling.flag_source`` (or ``--flag`` on the command line)
says where it comes from:

* ``oracle`` — the patient's true label (paper rule on the real follow-up); evaluation only.
* ``0`` / ``1`` — a user-given flag: every sample is drawn under it.
* a probability ``p`` — ``external`` takes the manifest's ``he_prob`` (an external HE classifier),
  ``classifier`` the built-in one (:mod:`hemexp.sampling.classifier`), and a number in (0, 1) is used as is.
  The N samples are then split p : 1−p between flag 1 and flag 0 with the deterministic rule
  ``n1 = floor(p·N + 0.5)`` (round half up: p = 0.4, N = 5 -> 2 flag-1 and 3 flag-0 samples; p = 0.5,
  N = 5 -> 3 : 2), flag-1 samples first. Probability maps are mixed with the weights p and 1−p
  themselves, not n1/N (see :func:`hemexp.sampling.products.mix_maps`).

When rounding leaves one flag with no sample although 0 < p < 1 (e.g. p = 0.05, N = 5), the mixed map
would lack the p-weighted term; :func:`plan_flags` then adds one *map-only* sample of that flag. It
contributes to that flag's probability map only — it is not written as a sample, not listed in
``volumes.tsv`` and not counted in P(expansion) or the volume intervals, which stay the split's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hemexp.core.errors import PatientInputError
from hemexp.core.layout import Layout

SOURCES = ("oracle", "classifier", "external")


@dataclass(frozen=True)
class FlagPlan:
    """Flags of one patient's samples: ``flags[k]`` for sample k, plus map-only extra samples.

    ``source`` names where the flag came from (oracle, classifier, external, user, probability);
    ``p`` is P(flag = 1) used for the split (0 or 1 for a hard flag).
    """

    source: str
    p: float
    flags: tuple[int, ...]
    map_only: tuple[int, ...] = ()

    @property
    def n_samples(self) -> int:
        return len(self.flags)

    @property
    def all_flags(self) -> tuple[int, ...]:
        """Flags of every generated sample: the split's, then the map-only ones."""
        return self.flags + self.map_only

    @property
    def weights(self) -> dict[int, float]:
        """Mixing weight of each flag's probability map (only flags that have samples)."""
        present = set(self.all_flags)
        return {f: (self.p if f == 1 else 1.0 - self.p) for f in (1, 0) if f in present}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "p": self.p, "n_flag1": self.flags.count(1), "n_flag0": self.flags.count(0),
                "map_only_flags": list(self.map_only)}


def split_counts(p: float, n: int) -> tuple[int, int]:
    """(n1, n0) for N samples at P(flag 1) = p: n1 = floor(p·N + 0.5), n0 = N − n1."""
    if not 0.0 <= p <= 1.0 or not math.isfinite(p):
        raise ValueError(f"expansion probability must be in [0, 1], got {p}")
    if n < 1:
        raise ValueError(f"need at least one sample, got {n}")
    n1 = min(n, int(math.floor(p * n + 0.5)))
    return n1, n - n1


def plan_flags(p: float, n: int, source: str, complete_maps: bool = True) -> FlagPlan:
    """Split N samples between the flags (see module docstring); flag-1 samples come first.

    ``complete_maps``: add one map-only sample for a flag that rounding left empty while 0 < p < 1.
    """
    n1, n0 = split_counts(p, n)
    extra: tuple[int, ...] = ()
    if complete_maps and 0.0 < p < 1.0:
        extra = (1,) if n1 == 0 else (0,) if n0 == 0 else ()
    return FlagPlan(source=source, p=float(p), flags=(1,) * n1 + (0,) * n0, map_only=extra)


def parse_flag_source(value: Any) -> str | float:
    """Normalise a config/CLI flag source: 'oracle' | 'classifier' | 'external' or a number in [0, 1].

    ``0``/``1`` (int or string) mean a hard flag, other numbers a probability.
    """
    if isinstance(value, str) and value.strip().lower() in SOURCES:
        return value.strip().lower()
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"flag source must be one of {SOURCES}, 0, 1 or a probability, got {value!r}") from None
    if not 0.0 <= p <= 1.0 or not math.isfinite(p):
        raise ValueError(f"flag probability must be in [0, 1], got {value!r}")
    return p


def resolve_probability(source: str | float, oracle: int | None = None, he_prob: float | None = None,
                        classifier: Callable[[], float] | None = None) -> tuple[float, str]:
    """(P(flag = 1), source label) of one patient.

    ``oracle``: the true label or None when unknown (a patient without follow-up); ``he_prob``: the
    manifest's external probability (None/NaN when absent); ``classifier``: a callable returning the
    built-in classifier's probability (called only when needed). A missing input raises ValueError
    naming what is missing.
    """
    source = parse_flag_source(source)
    if isinstance(source, float):
        return source, "user" if source in (0.0, 1.0) else "probability"
    if source == "oracle":
        if oracle is None:
            raise ValueError("flag source 'oracle' needs the true expansion label (no follow-up known)")
        return float(int(oracle)), "oracle"
    if source == "external":
        if he_prob is None or not math.isfinite(float(he_prob)):
            raise ValueError("flag source 'external' needs the manifest's he_prob column for this patient")
        return float(he_prob), "external"
    if classifier is None:
        raise ValueError("flag source 'classifier' needs a trained classifier (hemexp train-classifier)")
    return float(classifier()), "classifier"


def classifier_probability(path: str, features: dict[str, float]) -> float:
    """P(expansion) of one patient from the built-in classifier saved at ``path``.

    ``features``: the seven clinical variables (raw values) and ``baseline_ivh_ml``
    (:data:`hemexp.sampling.classifier.FEATURES`).
    """
    # Deferred: the Snakefile imports this module (flag_source_passes) at parse time; scikit-learn and
    # joblib are needed only when the classifier is the flag source.
    from hemexp.sampling.classifier import HEClassifier

    return float(HEClassifier.load(path).predict_proba(dict(features)))


def flag_plan_for(cfg: dict[str, Any], patient_id: str, summary: dict[str, Any], source: str | float,
                  n_samples: int) -> FlagPlan:
    """The flag plan of one preprocessed patient: resolve ``source`` from its preprocess ``summary``
    (true label, manifest ``he_prob``, the built-in classifier on its clinical values and baseline IVH
    volume) and split ``n_samples``. One resolver for ``hemexp sample`` and the guidance study, so a
    study patient is sampled under the flags its ``sample`` job uses.

    A missing input (no ``he_prob`` for 'external', ...) raises :class:`PatientInputError` naming the
    patient's summary; the classifier is loaded only when it is the source.
    """
    features = {**summary["clinical"], "baseline_ivh_ml": summary["volumes_ml"]["baseline"]["ivh"]}
    layout = Layout.of(cfg)
    try:
        p, label = resolve_probability(source, oracle=int(summary["expansion"]), he_prob=summary.get("he_prob"),
                                       classifier=lambda: classifier_probability(str(layout.classifier), features))
    except ValueError as err:
        raise PatientInputError(patient_id, layout.preprocessed(patient_id) / "summary.json", str(err)) from err
    return plan_flags(p, n_samples, label)


def flag_source_passes(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """``evaluation.flag_source_passes`` resolved: source -> flag-conditioned sampled variants.

    A source equal to ``sampling.flag_source`` is dropped (the main pass already is that source).
    Which sources and variants may be named (sampled, flag-conditioned) are config rules, checked by
    :func:`hemexp.core.config.validate_config` before the workflow or a command gets here.
    """
    spec = cfg["evaluation"].get("flag_source_passes") or {}
    main = str(cfg["sampling"]["flag_source"])
    return {source: list(dict.fromkeys(names)) for source, names in spec.items() if source != main and names}
