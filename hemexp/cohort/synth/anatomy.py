"""Procedural head anatomy in HU: scalp, skull, CSF, gray/white matter, deep nuclei, ventricles.

Why by hand: the cohort must run without downloading atlases, be exactly reproducible from a seed
and know every structure analytically (ventricle compartments for IVH layering, intracranial space
for brain-volume checks). The head is an ellipsoidal cranium whose radius is modulated by a smooth
function of direction, cut by a sloping skull base; sulci are the near-zero band of a smooth random
field in the cortical ribbon. Coordinates are *anatomy* coordinates: millimetres, RAS axes, origin
at the centre of the cranial cavity; scan pose and mass effect are applied by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hemexp.cohort.synth.fields import Ellipsoid, FourierNoise, Points, rotation_matrix

AIR, SOFT, BONE, CSF, GM, WM, DEEP, VENTRICLE, HOLDER = range(9)
PARENCHYMA = (CSF, GM, WM, DEEP)  # intracranial space outside the ventricles: where IPH may lie
INTRACRANIAL = (*PARENCHYMA, VENTRICLE)
COMPARTMENTS = {1: "left_lateral", 2: "right_lateral", 3: "third", 4: "fourth"}
REF_AXES = np.array([66.0, 84.0, 62.0])  # inner-skull semi-axes the structure positions are given for

# (compartment, centre, semi-axes, yaw deg) of ventricle parts for the right side (x > 0); mirrored.
_LATERAL_PARTS = (
    ((10.0, 20.0, 10.0), (5.0, 11.0, 8.0), 0.0),  # frontal horn
    ((10.0, -2.0, 16.0), (5.0, 24.0, 6.0), 6.0),  # body
    ((17.0, -28.0, 10.0), (7.0, 9.0, 9.0), 20.0),  # atrium
    ((19.0, -42.0, 8.0), (4.0, 10.0, 4.5), 15.0),  # occipital horn
    ((28.0, -12.0, -14.0), (3.5, 13.0, 4.0), -10.0),  # temporal horn
)
NUCLEI = {  # name: (centre right side, semi-axes, yaw deg); deep gray matter and deep ICH sites
    "caudate": ((15.0, 14.0, 7.0), (4.5, 9.0, 7.0), 10.0),
    "putamen": ((24.0, 4.0, 0.0), (5.5, 14.0, 9.0), -8.0),
    "thalamus": ((11.0, -13.0, 2.0), (8.0, 12.0, 8.0), 0.0),
}
_SHAPE_TERMS = 7


def _shape_monomials(u: Points) -> list[np.ndarray]:
    ux, uy, uz = u
    return [uy, uz, uy * uz, ux * ux * uy, uy * uy * uy, uz * uz * uz, ux]


@dataclass
class Anatomy:
    """Parameters of one patient's head (anatomy coordinates) and its HU values."""

    axes: np.ndarray  # inner-skull semi-axes (mm)
    shape_coef: np.ndarray  # coefficients of _shape_monomials (relative radius change)
    skull_mm: float
    skull_occipital_mm: float
    scalp_mm: float
    csf_mm: float  # subarachnoid CSF layer
    gm_mm: float  # cortical ribbon
    base_z0: float  # skull base plane z = az * (base_z0 + base_slope * y / ay)
    base_slope: float
    base_plate_mm: float
    ventricles: list[tuple[int, Ellipsoid]]
    nuclei: dict[str, Ellipsoid]  # "putamen_R", "thalamus_L", ...
    sulci: FourierNoise
    sulcus_width: float
    gm_width: float
    sulcus_depth_mm: float
    texture: FourierNoise
    hu: dict[str, float]
    ventricle_y_quantiles: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def scale(self) -> np.ndarray:
        return self.axes / REF_AXES

    def inner_distance(self, pts: Points) -> tuple[np.ndarray, np.ndarray]:
        """(signed distance to the inner skull surface along the ray from the origin (mm, < 0
        inside), unit-direction y component) for points."""
        x, y, z = pts
        ax, ay, az = (np.float32(a) for a in self.axes)
        r = np.sqrt(x * x + y * y + z * z) + np.float32(1e-3)
        rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2) + np.float32(1e-3 / 70)
        u = (x / r, y / r, z / r)
        eps = np.float32(-0.05) * u[0] * u[0] * u[1]  # egg shape: narrower in front
        for c, m in zip(self.shape_coef.astype(np.float32), _shape_monomials(u), strict=True):
            eps = eps + c * m
        return r - (r / rho) * (np.float32(1) + eps), u[1]

    def base_offset(self, pts: Points) -> np.ndarray:
        """Height above the skull-base plane (mm); the cranial cavity needs > 0."""
        _, y, z = pts
        ay, az = self.axes[1], self.axes[2]
        return z - np.float32(az * self.base_z0) - np.float32(az * self.base_slope / ay) * y

    def intracranial(self, pts: Points) -> np.ndarray:
        d, _ = self.inner_distance(pts)
        return (d < 0) & (self.base_offset(pts) > 0)

    def intracranial_ml(self, spacing: float = 2.0) -> float:
        """Volume of the cranial cavity (the 'brain mask' volume a skull stripper should find)."""
        half = self.axes * 1.12
        axes = [np.arange(-h, h + spacing, spacing, dtype=np.float32) for h in half]
        pts = tuple(np.meshgrid(*axes, indexing="ij"))
        return float(np.count_nonzero(self.intracranial(pts))) * spacing**3 / 1000.0  # type: ignore[arg-type]

    def ventricle_compartment(self, pts: Points) -> np.ndarray:
        """Compartment id (see COMPARTMENTS) of each point, 0 outside the ventricles."""
        comp = np.zeros(np.shape(pts[0]), dtype=np.int8)
        for cid, ell in self.ventricles:
            lo, hi = ell.bounds()
            box = np.ones(comp.shape, dtype=bool)
            for p, a, b in zip(pts, lo, hi, strict=True):
                box &= (p >= a) & (p <= b)
            if not box.any():
                continue
            sub = tuple(p[box] for p in pts)
            idx = np.flatnonzero(box)
            inside = ell.q(sub) < 1  # type: ignore[arg-type]
            comp.ravel()[idx[inside]] = cid
        return comp


def _ellipsoid(centre, axes, yaw, scale: np.ndarray, mirror: bool = False) -> Ellipsoid:
    c = np.array(centre, dtype=float) * scale
    if mirror:
        c[0] = -c[0]
    return Ellipsoid(centre=c, axes=np.array(axes, float), rotation=rotation_matrix((0, 0, -yaw if mirror else yaw)))


def _ventricles(scale: np.ndarray, size: float) -> list[tuple[int, Ellipsoid]]:
    out = []
    for mirror, cid in ((True, 1), (False, 2)):  # left lateral = x < 0
        for centre, axes, yaw in _LATERAL_PARTS:
            out.append((cid, _ellipsoid(centre, np.array(axes) * size, yaw, scale, mirror)))
    out.append((3, _ellipsoid((0, -5, -2), (2.2 * np.sqrt(size), 12.0, 7.0), 0.0, scale)))
    out.append((4, _ellipsoid((0, -40, -30), (5.0, 3.5, 6.0), 0.0, scale)))
    return out


def _ventricle_quantiles(anat: Anatomy) -> dict[int, np.ndarray]:
    """Per compartment, the 0..100 % quantiles of y: where a given fraction of it lies posterior
    (the dependent part in a supine patient, where intraventricular blood layers)."""
    los, his = zip(*(e.bounds() for _, e in anat.ventricles), strict=True)
    lo, hi = np.min(los, axis=0), np.max(his, axis=0)
    axes = [np.arange(a, b + 1.0, 1.0, dtype=np.float32) for a, b in zip(lo, hi, strict=True)]
    pts = tuple(np.meshgrid(*axes, indexing="ij"))
    comp = anat.ventricle_compartment(pts)  # type: ignore[arg-type]
    return {cid: np.quantile(pts[1][comp == cid], np.linspace(0, 1, 101)) for cid in COMPARTMENTS}


def draw_anatomy(rng: np.random.Generator, age: float, icv_ml: tuple[float, float] = (1150.0, 1500.0)) -> Anatomy:
    """One patient's head. Age enlarges ventricles, sulci and the CSF layer (atrophy); the cranial
    cavity is rescaled to a volume drawn from ``icv_ml`` so every brain mask is realistic."""
    atrophy = float(np.clip((age - 60.0) / 30.0, -1.0, 1.2))
    axes = REF_AXES * np.exp(rng.normal(0.0, 0.035, 3))
    coef = rng.normal(0.0, 0.015, _SHAPE_TERMS)
    coef[-1] *= 0.3  # left-right asymmetry is small
    gm, wm = rng.uniform(37.0, 42.0), rng.uniform(26.0, 31.0)
    anat = Anatomy(
        axes=axes, shape_coef=coef,
        skull_mm=rng.uniform(4.5, 7.0), skull_occipital_mm=rng.uniform(1.0, 3.0),
        scalp_mm=rng.uniform(6.0, 10.0), csf_mm=rng.uniform(1.0, 2.0) + 1.0 * max(atrophy, 0.0),
        gm_mm=rng.uniform(2.5, 3.5), base_z0=rng.uniform(-0.43, -0.37), base_slope=rng.uniform(0.27, 0.33),
        base_plate_mm=rng.uniform(6.0, 10.0), ventricles=[], nuclei={},
        sulci=FourierNoise.draw(rng, 14, (16.0, 30.0)), sulcus_width=0.16 + 0.08 * max(atrophy, -0.5),
        gm_width=0.42, sulcus_depth_mm=rng.uniform(14.0, 20.0),
        texture=FourierNoise.draw(rng, 8, (4.0, 10.0)),
        hu={"gm": gm, "wm": wm, "deep": 0.5 * (gm + wm) + 1.5, "csf": rng.uniform(3.0, 10.0),
            "soft": rng.uniform(30.0, 45.0), "table": rng.uniform(1300.0, 1500.0),
            "diploe": rng.uniform(700.0, 900.0), "air": -1000.0},
    )
    target = rng.uniform(*icv_ml)
    anat.axes = anat.axes * (target / anat.intracranial_ml(3.0)) ** (1.0 / 3.0)
    size = float(np.clip(1.05 + 0.25 * atrophy + rng.normal(0.0, 0.08), 0.85, 1.7))
    anat.ventricles = _ventricles(anat.scale, size)
    for name, (centre, semi, yaw) in NUCLEI.items():
        for side, mirror in (("L", True), ("R", False)):
            anat.nuclei[f"{name}_{side}"] = _ellipsoid(centre, semi, yaw, anat.scale, mirror)
    anat.ventricle_y_quantiles = _ventricle_quantiles(anat)
    return anat


def head_extent(anat: Anatomy, spacing: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box (lo, hi) in anatomy coordinates of the head above the skull base (scalp included)."""
    half = anat.axes * 1.12 + anat.skull_mm + anat.skull_occipital_mm + anat.scalp_mm + spacing
    axes = [np.arange(-h, h + spacing, spacing, dtype=np.float32) for h in half]
    pts = tuple(np.meshgrid(*axes, indexing="ij"))
    d, uy = anat.inner_distance(pts)  # type: ignore[arg-type]
    outer = anat.skull_mm + anat.skull_occipital_mm * np.square(np.minimum(uy, 0)) + anat.scalp_mm
    head = (d < outer) & (anat.base_offset(pts) > -anat.base_plate_mm)  # type: ignore[arg-type]
    coords = np.stack([p[head] for p in pts])
    return coords.min(axis=1) - spacing / 2, coords.max(axis=1) + spacing / 2


def may_be_head(anat: Anatomy, pts: Points) -> np.ndarray:
    """Cheap superset of the points :func:`evaluate` may find non-air (head, neck, with room for
    mass-effect displacement); points outside are air."""
    x, y, z = pts
    reach = np.float32(anat.skull_mm + anat.skull_occipital_mm + anat.scalp_mm + 15.0)
    big = [np.float32(a * 1.12) + reach for a in anat.axes]
    head = (x / big[0]) ** 2 + (y / big[1]) ** 2 + (z / big[2]) ** 2 < 1
    ax, ay = anat.axes[0], anat.axes[1]
    neck = (x / np.float32(0.8 * ax + 5)) ** 2 + ((y + np.float32(0.2 * ay)) / np.float32(0.62 * ay + 5)) ** 2 < 1
    return head | (neck & (z < 0))


@dataclass
class Tissue:
    """Per-point result of evaluating the anatomy: label, clean HU (no noise), ventricle compartment."""

    label: np.ndarray
    hu: np.ndarray
    compartment: np.ndarray


def evaluate(anat: Anatomy, pts: Points) -> Tissue:
    """Label and noise-free HU of the head at points given in anatomy coordinates."""
    shape = np.shape(pts[0])
    label = np.full(shape, AIR, dtype=np.int8)
    hu = np.full(shape, anat.hu["air"], dtype=np.float32)
    comp = np.zeros(shape, dtype=np.int8)
    d, uy = anat.inner_distance(pts)
    skull = np.float32(anat.skull_mm) + np.float32(anat.skull_occipital_mm) * np.square(np.minimum(uy, 0))
    outer = skull + np.float32(anat.scalp_mm)
    base = anat.base_offset(pts)
    _neck(anat, pts, d, base, label, hu)
    head = d < outer
    label[head] = SOFT
    plate = (base <= 0) & (base > -anat.base_plate_mm)
    # the vault closes on the skull-base plate; below it (face, neck) there is no bony shell
    bone = head & (d < skull) & (((d >= 0) & (base > 0)) | plate)
    label[bone] = BONE
    frac = np.clip(np.where((d >= 0) & (base > 0), d / skull, -base / np.float32(anat.base_plate_mm)), 0, 1)
    bone_hu = np.float32(anat.hu["diploe"]) + np.float32(anat.hu["table"] - anat.hu["diploe"]) * np.abs(2 * frac - 1) ** 1.5
    hu[head] = anat.hu["soft"]
    hu[bone] = bone_hu[bone]
    _sinuses(anat, pts, base, label, hu)
    inside = (d < 0) & (base > 0)
    idx = np.flatnonzero(inside)
    sub = tuple(p.ravel()[idx] for p in pts)
    lab, sub_hu, sub_comp = _brain(anat, sub, d.ravel()[idx], base.ravel()[idx])  # type: ignore[arg-type]
    label.ravel()[idx], hu.ravel()[idx], comp.ravel()[idx] = lab, sub_hu, sub_comp
    soft = label == SOFT
    hu[soft] += np.float32(4.0) * anat.texture(tuple(p[soft] for p in pts))  # type: ignore[arg-type]
    hu[soft & (base < -anat.base_plate_mm)] -= np.float32(25.0)  # face/neck: muscle mixed with fat
    return Tissue(label=label, hu=hu, compartment=comp)


def _neck(anat: Anatomy, pts: Points, d: np.ndarray, base: np.ndarray, label: np.ndarray, hu: np.ndarray) -> None:
    """Soft-tissue neck and a cervical vertebra below the skull base, so low slices look like a head."""
    x, y, z = pts
    ax, ay = anat.axes[0], anat.axes[1]
    neck = ((x / np.float32(0.8 * ax)) ** 2 + ((y + np.float32(0.2 * ay)) / np.float32(0.62 * ay)) ** 2 < 1) & (base < 0)
    label[neck] = SOFT
    hu[neck] = anat.hu["soft"]
    spine = neck & ((x / np.float32(11.0)) ** 2 + ((y + np.float32(0.22 * ay)) / np.float32(9.0)) ** 2 < 1) & (d > 0)
    label[spine] = BONE
    hu[spine] = 0.5 * (anat.hu["diploe"] + 300.0)


def _sinuses(anat: Anatomy, pts: Points, base: np.ndarray, label: np.ndarray, hu: np.ndarray) -> None:
    """Air-filled paranasal sinuses under the anterior skull base (dark holes in the lowest slices)."""
    below = np.flatnonzero((base < -anat.base_plate_mm) & (label == SOFT))
    sub = tuple(p.ravel()[below] for p in pts)
    ay, az = anat.axes[1], anat.axes[2]
    z0 = az * (anat.base_z0 + anat.base_slope * 0.6) - anat.base_plate_mm - 14.0
    air = np.zeros(below.size, dtype=bool)
    for x0 in (-16.0, 0.0, 16.0):
        semi = (6.0, 9.0, 8.0) if x0 == 0 else (10.0, 12.0, 13.0)
        ell = Ellipsoid(centre=np.array([x0, 0.6 * ay, z0]), axes=np.array(semi), rotation=np.eye(3))
        air |= ell.q(sub) < 1  # type: ignore[arg-type]
    label.ravel()[below[air]] = AIR
    hu.ravel()[below[air]] = -950.0


def _brain(anat: Anatomy, pts: Points, d: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels/HU inside the cranial cavity; later assignments take precedence."""
    x, y, z = pts
    label = np.full(x.shape, WM, dtype=np.int8)
    for ell in anat.nuclei.values():
        lo, hi = ell.bounds()
        box = (x > lo[0]) & (x < hi[0]) & (y > lo[1]) & (y < hi[1]) & (z > lo[2]) & (z < hi[2])
        sel = np.flatnonzero(box)
        label[sel[ell.q(tuple(p[sel] for p in pts)) < 1]] = DEEP  # type: ignore[arg-type]
    depth = -d
    ribbon = np.flatnonzero(depth < anat.sulcus_depth_mm)
    g = np.abs(anat.sulci(tuple(p[ribbon] for p in pts)))  # type: ignore[arg-type]
    taper = np.clip(1.0 - depth[ribbon] / np.float32(anat.sulcus_depth_mm), 0, 1)
    cortex = (g < anat.gm_width) | (depth[ribbon] < anat.csf_mm + anat.gm_mm)
    label[ribbon[cortex]] = GM
    label[ribbon[g < np.float32(anat.sulcus_width) * (0.35 + 0.65 * taper)]] = CSF
    sy = anat.scale[1]
    cerebellum = (y < -20 * sy) & (z < np.float32(-18 * anat.scale[2]) + np.float32(0.25) * (y + np.float32(40 * sy)))
    label[cerebellum & (label == WM)] = GM
    fissure = (np.abs(x) < 1.2) & ((z > 18 * anat.scale[2]) | (np.abs(y) > 42 * sy))
    label[fissure] = CSF
    label[(depth < anat.csf_mm) | (base < anat.csf_mm)] = CSF
    comp = anat.ventricle_compartment(pts)
    label[comp > 0] = VENTRICLE
    comp[label != VENTRICLE] = 0
    lut = np.zeros(9, dtype=np.float32)
    lut[[CSF, GM, WM, DEEP, VENTRICLE]] = [anat.hu["csf"], anat.hu["gm"], anat.hu["wm"], anat.hu["deep"], anat.hu["csf"]]
    hu = lut[label] + np.float32(1.5) * anat.texture(pts)
    return label, hu, comp
