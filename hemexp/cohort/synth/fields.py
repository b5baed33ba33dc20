"""Small geometric building blocks of the phantom: seeded streams, smooth noise, ellipsoids, grids.

Why by hand: the phantom is an analytic object evaluated on millions of scan points, and no imaging
library offers seeded, coordinate-continuous noise or implicit ellipsoids. Everything here is plain
elementwise NumPy (no BLAS matmul) so the same seed gives bit-identical arrays on any thread count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Points = tuple[np.ndarray, np.ndarray, np.ndarray]  # (x, y, z) arrays of one shape, in mm


def patient_rng(seed: int, patient_id: str, purpose: str) -> np.random.Generator:
    """An independent stream per (cohort seed, patient, purpose).

    The patient and purpose enter as a stable hash (not Python's salted ``hash``), so adding a
    patient, or drawing one more number for the anatomy, never shifts anyone else's lesion.
    """
    digest = hashlib.sha256(f"{patient_id}\x00{purpose}".encode()).digest()
    key = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed) % 2**63, spawn_key=key))


def rotation_matrix(angles_deg: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """Rotation R = Rz(yaw) @ Ry(roll) @ Rx(pitch) from (pitch, roll, yaw) in degrees (RAS axes)."""
    a, b, c = np.radians(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation (for lesion lobes, whose orientation has no anatomical prior)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def apply_affine(m: np.ndarray, t: np.ndarray, pts: Points) -> Points:
    """``m @ p + t`` for point arrays, written elementwise (deterministic, float32-friendly)."""
    x, y, z = pts
    f = np.float32
    return tuple(
        f(m[i, 0]) * x + f(m[i, 1]) * y + f(m[i, 2]) * z + f(t[i]) for i in range(3)
    )  # type: ignore[return-value]


@dataclass(frozen=True)
class FourierNoise:
    """Smooth random field: a sum of random plane waves (random Fourier features).

    Evaluable at any point (unlike a noise volume) and roughly unit-variance; the wavelengths set the
    scale of the irregularity (sulcal pattern, lesion lobulation, growth speed).
    """

    freqs: np.ndarray  # (K, 3) angular frequencies, rad/mm
    phases: np.ndarray  # (K,)

    @classmethod
    def draw(cls, rng: np.random.Generator, n_terms: int, wavelength_mm: tuple[float, float]) -> FourierNoise:
        direction = rng.normal(size=(n_terms, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(*wavelength_mm, size=(n_terms, 1))
        return cls(freqs=2 * np.pi * direction / wavelength, phases=rng.uniform(0, 2 * np.pi, n_terms))

    def __call__(self, pts: Points) -> np.ndarray:
        x, y, z = pts
        out = np.zeros(np.shape(x), dtype=np.float32)
        for (fx, fy, fz), ph in zip(self.freqs.astype(np.float32), self.phases.astype(np.float32), strict=True):
            out += np.cos(fx * x + fy * y + fz * z + ph)
        out *= np.float32(np.sqrt(2.0 / len(self.phases)))
        return out


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid with centre (mm), semi-axes (mm) and rotation (columns = axis directions)."""

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray

    def q(self, pts: Points) -> np.ndarray:
        """Normalised quadratic form: < 1 inside, 1 on the surface."""
        d = tuple(p - np.float32(c) for p, c in zip(pts, self.centre, strict=True))
        local = apply_affine(self.rotation.T, np.zeros(3), d)  # type: ignore[arg-type]
        return sum((u / np.float32(a)) ** 2 for u, a in zip(local, self.axes, strict=True))

    @property
    def volume_ml(self) -> float:
        return float(4.0 / 3.0 * np.pi * np.prod(self.axes) / 1000.0)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (lo, hi) of the rotated ellipsoid."""
        half = np.sqrt(((self.rotation * self.axes[None, :]) ** 2).sum(axis=1))
        return self.centre - half, self.centre + half


@dataclass(frozen=True)
class LocalGrid:
    """A regular axis-aligned grid in head coordinates (mm) around a lesion."""

    origin: np.ndarray  # (3,) coordinate of voxel (0, 0, 0)
    spacing: float
    shape: tuple[int, int, int]

    @classmethod
    def around(cls, centre: np.ndarray, half_mm: float, spacing: float) -> LocalGrid:
        n = int(np.ceil(half_mm / spacing))
        return cls(origin=np.asarray(centre, float) - n * spacing, spacing=float(spacing), shape=(2 * n + 1,) * 3)

    def points(self) -> Points:
        axes = [np.float32(o) + np.float32(self.spacing) * np.arange(n, dtype=np.float32)
                for o, n in zip(self.origin, self.shape, strict=True)]
        return tuple(np.meshgrid(*axes, indexing="ij"))  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        return self.spacing**3 / 1000.0

    def contains(self, pts: Points, margin: float = 0.0) -> np.ndarray:
        inside = np.ones(np.shape(pts[0]), dtype=bool)
        for p, o, n in zip(pts, self.origin, self.shape, strict=True):
            inside &= (p >= o + margin) & (p <= o + (n - 1) * self.spacing - margin)
        return inside

    def sample(self, values: np.ndarray, pts: Points, outside: float) -> np.ndarray:
        """Trilinear interpolation of a field on this grid at points; ``outside`` beyond the box."""
        idx = [(p - np.float32(o)) / np.float32(self.spacing) for p, o in zip(pts, self.origin, strict=True)]
        return ndimage.map_coordinates(values, idx, order=1, mode="constant", cval=outside).astype(np.float32)
