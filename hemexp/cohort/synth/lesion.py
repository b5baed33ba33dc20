"""Intraparenchymal hematoma shape, its growth, intraventricular extension and mass effect.

Why by hand: no library simulates hematomas. The baseline clot is the zero level set of a field
``F = max_i (1 - q_i * (1 + a * N))`` over a few random ellipsoidal lobes ``q_i``, with a smooth
noise ``N`` modulating the radius (lobulated, irregular outline; bounded support). Growth is a front
moving out of the baseline clot with a spatially varying speed (smooth noise, a preferred direction
and one or two "growth lobes"), so the follow-up clot is the baseline plus an irregular, anisotropic
rim, never a scaled copy. The exact volume of either clot is set later, on the scan grid, by
choosing the level of the field (see :mod:`hemexp.cohort.synth.scan`); fields here are in approximate mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from hemexp.cohort.synth.anatomy import PARENCHYMA, Anatomy, evaluate
from hemexp.cohort.synth.fields import (
    Ellipsoid,
    FourierNoise,
    LocalGrid,
    Points,
    random_rotation,
    rotation_matrix,
)

LOCATIONS = {"basal_ganglia": 0.40, "thalamus": 0.20, "lobar": 0.40}
OUTSIDE = -1.0e6  # field value outside the lesion's local grid
MASS_EFFECT_GAIN = 0.7  # fraction of the clot volume that displaces tissue (rest compresses CSF)
MAX_SHIFT_MM = 10.0
MASS_EFFECT_DECAY_MM = 40.0  # beyond the clot: the field converges (CSF spaces are compressed)
MIN_IVH_OVERLAP_ML = 0.1  # smaller contacts with a ventricle wall are not called IVH


def equivalent_radius(volume_ml: float) -> float:
    return float((3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))


@dataclass
class Lesion:
    """One patient's hematoma in head coordinates (mm) and its baseline/follow-up fields."""

    location: str
    side: str
    centre: np.ndarray
    lobes: list[Ellipsoid]
    lobulation: FourierNoise
    lobulation_amp: float
    growth_noise: FourierNoise
    growth_dir: np.ndarray
    growth_lobes: list[tuple[Ellipsoid, float]]
    anisotropy: float
    grid: LocalGrid
    hu_iph: float
    hu_ivh: float
    baseline_field: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((1, 1, 1), np.float32))

    def describe(self) -> dict:
        return {"location": self.location, "side": self.side, "centre_mm": [round(float(c), 2) for c in self.centre],
                "n_lobes": len(self.lobes), "n_growth_lobes": len(self.growth_lobes)}


def _site(rng: np.random.Generator, anat: Anatomy, location: str, side: str) -> np.ndarray:
    """Centre of the clot: a deep nucleus (jittered) or a lobar point 12-24 mm under the cortex."""
    if location != "lobar":
        nucleus = anat.nuclei[f"{'putamen' if location == 'basal_ganglia' else 'thalamus'}_{side}"]
        return nucleus.centre + rng.normal(0.0, 2.0, 3)
    sign = -1.0 if side == "L" else 1.0
    for _ in range(100):
        u = rng.normal(size=3)
        u[0] = sign * abs(u[0]) + sign * 0.6
        u[2] = abs(u[2]) * 0.8 - 0.1
        u /= np.linalg.norm(u)
        surface = _surface_radius(anat, u)
        p = u * (surface - rng.uniform(14.0, 26.0))
        pts = tuple(np.array([v], np.float32) for v in p)
        if anat.intracranial(pts)[0] and anat.ventricle_compartment(_ball(p, 12.0)).max() == 0:  # type: ignore[arg-type]
            return p
    raise RuntimeError("no lobar hematoma site found")  # unreachable for plausible anatomy


def _surface_radius(anat: Anatomy, u: np.ndarray) -> float:
    radii = np.linspace(5.0, 140.0, 271, dtype=np.float32)
    pts = tuple(np.float32(c) * radii for c in u)
    inside = anat.intracranial(pts)  # type: ignore[arg-type]
    return float(radii[np.argmin(inside)] if not inside.all() else radii[-1])


def _ball(centre: np.ndarray, radius: float) -> Points:
    g = np.linspace(-radius, radius, 7, dtype=np.float32)
    pts = np.meshgrid(g, g, g, indexing="ij")
    return tuple(p + np.float32(c) for p, c in zip(pts, centre, strict=True))  # type: ignore[return-value]


def _lobes(rng: np.random.Generator, centre: np.ndarray, radius: float, location: str) -> list[Ellipsoid]:
    main_axes = radius * np.array([1.0, rng.uniform(1.1, 1.5), rng.uniform(0.75, 0.95)])
    if location == "lobar":
        rot = random_rotation(rng)
    else:  # deep hematomas are ovoid along the antero-posterior course of the nuclei
        rot = rotation_matrix((rng.normal(0.0, 8.0), 0.0, rng.normal(0.0, 10.0)))
    lobes = [Ellipsoid(centre=centre, axes=main_axes, rotation=rot)]
    for _ in range(int(rng.integers(1, 4))):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        lobes.append(Ellipsoid(centre=centre + d * radius * rng.uniform(0.5, 0.85),
                               axes=radius * rng.uniform(0.4, 0.7, 3), rotation=random_rotation(rng)))
    return lobes


def draw_lesion(rng: np.random.Generator, anat: Anatomy, target_ml: float, max_relative_growth: float,
                location: str | None = None, side: str | None = None) -> Lesion:
    """A clot of about ``target_ml`` at a random site (or the given ``location`` in LOCATIONS and
    ``side`` L/R); its local grid leaves room for growth by ``max_relative_growth``."""
    names = list(LOCATIONS)
    drawn_location = names[int(rng.choice(len(names), p=list(LOCATIONS.values())))]
    drawn_side = "L" if rng.random() < 0.5 else "R"
    location, side = location or drawn_location, side or drawn_side
    if location not in LOCATIONS or side not in ("L", "R"):
        raise ValueError(f"unknown hematoma site {location!r}/{side!r}; locations: {', '.join(LOCATIONS)}")
    centre = _site(rng, anat, location, side)
    radius = equivalent_radius(target_ml) * 1.25
    lobes = _lobes(rng, centre, radius, location)
    growth_dir = rng.normal(size=3)
    growth_dir /= np.linalg.norm(growth_dir)
    growth_lobes = []
    for _ in range(int(rng.integers(1, 3))):
        d = growth_dir + 0.6 * rng.normal(size=3)
        d /= np.linalg.norm(d)
        ell = Ellipsoid(centre=centre + d * radius * rng.uniform(1.0, 1.6),
                        axes=radius * rng.uniform(0.5, 0.9, 3), rotation=random_rotation(rng))
        growth_lobes.append((ell, float(rng.uniform(1.0, 3.0))))
    reach = max(float(np.max(np.abs(np.array(e.bounds()) - centre))) for e in lobes)
    half = min(reach * 1.6 + 1.3 * equivalent_radius(target_ml * (1.0 + max_relative_growth)), 80.0)
    lesion = Lesion(
        location=location, side=side, centre=centre, lobes=lobes,
        lobulation=FourierNoise.draw(rng, 10, (8.0, 18.0)), lobulation_amp=float(rng.uniform(0.15, 0.3)),
        growth_noise=FourierNoise.draw(rng, 10, (12.0, 30.0)), growth_dir=growth_dir,
        growth_lobes=growth_lobes, anisotropy=float(rng.uniform(0.5, 1.5)),
        grid=LocalGrid.around(centre, half, max(1.0, half / 40.0)),
        hu_iph=float(rng.uniform(58.0, 75.0)), hu_ivh=float(rng.uniform(48.0, 65.0)),
    )
    lesion.baseline_field = _baseline_field(lesion, anat, target_ml)
    return lesion


def _shape_field(lesion: Lesion, pts: Points) -> np.ndarray:
    n = np.clip(lesion.lobulation(pts), -2.0, 2.0)
    mod = np.float32(1.0) + np.float32(lesion.lobulation_amp) * n
    return np.max(np.stack([np.float32(1) - e.q(pts) * mod for e in lesion.lobes]), axis=0)


def _baseline_field(lesion: Lesion, anat: Anatomy, target_ml: float) -> np.ndarray:
    """Shape field shifted so its zero level holds about ``target_ml`` of parenchyma, scaled to ~mm.

    The lobes are enlarged until that level is comfortably positive (a bounded, noise-free outline).
    """
    pts = lesion.grid.points()
    pressed = compress_ventricles(anat, lesion.centre, target_ml)
    tissue = parenchyma_mask(pressed, displace(pts, lesion.centre, target_ml, anat))
    for _ in range(8):
        f = _shape_field(lesion, pts)
        vals = np.sort(f[tissue])[::-1]
        n = int(round(target_ml / lesion.grid.voxel_ml))
        level = float(vals[min(n, vals.size - 1)])
        if level >= 0.2:
            radius = float(np.mean(lesion.lobes[0].axes))
            return ((f - np.float32(level)) * np.float32(radius / 2.0)).astype(np.float32)
        lesion.lobes = [Ellipsoid(e.centre + (e.centre - lesion.centre) * 0.2, e.axes * 1.25, e.rotation)
                        for e in lesion.lobes]
    raise RuntimeError("hematoma lobes could not hold the target volume")  # unreachable: 8 x 25 % growth


def parenchyma_mask(anat: Anatomy, pts: Points) -> np.ndarray:
    """Where an intraparenchymal clot may lie: cranial cavity outside the ventricles."""
    return np.isin(evaluate(anat, pts).label, PARENCHYMA)


def followup_field(lesion: Lesion, baseline_level: float) -> np.ndarray:
    """Field whose zero level is the baseline clot and whose negative values are minus the arrival
    time (mm at unit speed) of the growth front; thresholding it lower grows the clot irregularly."""
    core = lesion.baseline_field >= baseline_level
    dist = ndimage.distance_transform_edt(~core, sampling=lesion.grid.spacing).astype(np.float32)
    pts = lesion.grid.points()
    speed = np.exp(np.float32(0.45) * lesion.growth_noise(pts))
    rel = tuple(p - np.float32(c) for p, c in zip(pts, lesion.centre, strict=True))
    norm = np.sqrt(sum(r * r for r in rel)) + np.float32(1e-3)
    along = sum(r * np.float32(g) for r, g in zip(rel, lesion.growth_dir, strict=True)) / norm
    speed *= np.float32(1.0) + np.float32(lesion.anisotropy) * np.maximum(along, 0)
    for ell, boost in lesion.growth_lobes:
        speed *= np.float32(1.0) + np.float32(boost) * np.exp(-ell.q(pts))
    inside = lesion.baseline_field - np.float32(baseline_level)
    return np.where(core, inside, -dist / speed).astype(np.float32)


def displace(pts: Points, centre: np.ndarray, volume_ml: float, anat: Anatomy) -> Points:
    """Anatomy coordinates of head points under the clot's mass effect (inverse warp, approximate).

    Tissue is pushed radially away from the clot centre by ``gain * V / (4 pi r^2)`` (an expanding
    source in an incompressible medium), times ``exp(-(r - r0) / decay)``: the extra decay makes the
    field converge, i.e. nearby tissue loses volume, as the ventricles and sulci do when CSF is
    squeezed out. Linear inside the clot, capped, and tapered to zero at the inner skull. The result
    compresses the ipsilateral ventricle and shifts the midline to the other side, more for larger clots.
    """
    if volume_ml <= 0:
        return pts
    r0 = equivalent_radius(volume_ml)
    rel = [p - np.float32(c) for p, c in zip(pts, centre, strict=True)]
    r = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) + np.float32(1e-3)
    mag = np.float32(MASS_EFFECT_GAIN * volume_ml * 1000.0 / (4 * np.pi)) / np.maximum(r, np.float32(r0)) ** 2
    mag *= np.minimum(r / np.float32(r0), 1) * np.exp(-np.maximum(r - np.float32(r0), 0) / np.float32(MASS_EFFECT_DECAY_MM))
    mag = np.minimum(mag, np.float32(MAX_SHIFT_MM))
    depth, _ = anat.inner_distance(pts)
    mag *= np.clip(-depth / np.float32(25.0), 0, 1)
    return tuple(p - mag * d / r for p, d in zip(pts, rel, strict=True))  # type: ignore[return-value]


def compress_ventricles(anat: Anatomy, centre: np.ndarray, volume_ml: float) -> Anatomy:
    """The anatomy with ventricle parts near the clot shrunk (effacement), more for larger clots.

    The displacement field alone moves ventricles but barely changes their volume; real mass effect
    squeezes CSF out of the nearby ventricle first. Each ellipsoidal part loses up to 80 % of its
    volume (clots >= 60 mL), weighted by ``exp(-distance / 30 mm)``; IVH fill levels keep referring
    to the original shape.
    """
    if volume_ml <= 0:
        return anat
    strength = 0.8 * min(volume_ml / 60.0, 1.0)
    parts = []
    for cid, ell in anat.ventricles:
        kept = 1.0 - strength * float(np.exp(-np.linalg.norm(ell.centre - centre) / 30.0))
        parts.append((cid, Ellipsoid(ell.centre, ell.axes * kept ** (1.0 / 3.0), ell.rotation)))
    return replace(anat, ventricles=parts)


def ivh_fill(overlap_ml: dict[int, float], previous: dict[int, float] | None = None) -> dict[int, float]:
    """Fraction of each ventricle compartment filled (from its dependent, posterior end) with blood.

    Blood entering one compartment spreads with the CSF: the third ventricle and, for larger
    ruptures, the other lateral and the fourth ventricle get a smaller share. Never less than before.
    """
    fill = dict(previous or {})
    total = sum(overlap_ml.values())
    if total >= MIN_IVH_OVERLAP_ML:
        primary = max(overlap_ml, key=lambda c: (overlap_ml[c], -c))
        f = float(np.clip(0.15 + 0.08 * total, 0.15, 0.75))
        share = {primary: f, 3: 0.6 * f}
        if total > 1.0:
            share[4] = 0.4 * f
        if total > 2.0:
            share.update({c: 0.4 * f for c in (1, 2) if c != primary})
        for c, v in share.items():
            fill[c] = max(fill.get(c, 0.0), v)
    return fill
