"""Procedural 3D solids with exact signed distances, areas and volumes (the synthetic shape data).

Each solid is one class holding everything about it: its signed distance in its own frame
(Inigo Quilez's formulas, axis z), area-uniform surface sampling, volume, bounding radius,
random proportions and the words a caption uses for its look. A posed solid is a params dict
``{"solid": name, <dimensions>, "rotation": (3, 3), "center": (3,)}`` (what shards store in
``json``); the functions at the bottom take one. Legend: M points.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np


def _length(*parts: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(p * p for p in parts))


def _disc(n: int, radius: float, z: float, rng: np.random.Generator) -> np.ndarray:
    r, phi = radius * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(phi), r * np.sin(phi), np.full(n, z)], axis=1)


def _aspect_word(aspect: float, tall: float, flat: float) -> str:
    return "tall" if aspect > tall else "flat" if aspect < flat else ""


class Solid:
    """One kind of solid, in its own frame (axis z); params are its dimensions."""

    name: ClassVar[str]

    def sdf(self, params: dict, p: np.ndarray) -> np.ndarray:
        """Exact signed distance (M,) of points p (M, 3), negative inside."""
        raise NotImplementedError

    def surface(self, params: dict, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 3) points uniform by area on the surface."""
        raise NotImplementedError

    def volume(self, params: dict) -> float:
        raise NotImplementedError

    def bounding_radius(self, params: dict) -> float:
        """Largest distance of the solid from its own centre."""
        raise NotImplementedError

    def proportions(self, rng: np.random.Generator) -> dict:
        """Dimensions at an arbitrary scale (scaled to a bounding radius afterwards)."""
        raise NotImplementedError

    def look(self, params: dict) -> tuple[str, str]:
        """(adjective or "", noun) for captions such as "a small tall cylinder"."""
        return "", self.name


class Sphere(Solid):
    name = "sphere"

    def sdf(self, params: dict, p: np.ndarray) -> np.ndarray:
        return _length(p[:, 0], p[:, 1], p[:, 2]) - params["radius"]

    def surface(self, params: dict, n: int, rng: np.random.Generator) -> np.ndarray:
        d = rng.standard_normal((n, 3))
        return params["radius"] * d / np.linalg.norm(d, axis=1, keepdims=True)

    def volume(self, params: dict) -> float:
        return 4 / 3 * np.pi * params["radius"] ** 3

    def bounding_radius(self, params: dict) -> float:
        return params["radius"]

    def proportions(self, rng: np.random.Generator) -> dict:
        return {"radius": 1.0}


class Box(Solid):
    name = "box"

    def sdf(self, params: dict, p: np.ndarray) -> np.ndarray:
        q = np.abs(p) - np.asarray(params["half_extents"])  # (M, 3)
        return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)

    def surface(self, params: dict, n: int, rng: np.random.Generator) -> np.ndarray:
        a = np.asarray(params["half_extents"])
        areas = np.array([a[1] * a[2], a[0] * a[2], a[0] * a[1]])  # faces normal to x, y, z
        axis = rng.choice(3, size=n, p=areas / areas.sum())
        p = rng.uniform(-a, a, size=(n, 3))
        p[np.arange(n), axis] = a[axis] * rng.choice([-1.0, 1.0], size=n)
        return p

    def volume(self, params: dict) -> float:
        return float(8 * np.prod(params["half_extents"]))

    def bounding_radius(self, params: dict) -> float:
        return float(np.linalg.norm(params["half_extents"]))

    def proportions(self, rng: np.random.Generator) -> dict:
        return {"half_extents": rng.uniform(0.25, 1.0, 3).tolist()}

    def look(self, params: dict) -> tuple[str, str]:
        small, mid, big = sorted(params["half_extents"])
        if big / small < 1.4:
            return "", "cube"
        return "flat" if small / mid < 0.5 else "long" if big / mid > 2 else "", self.name


class Cylinder(Solid):
    name = "cylinder"

    def sdf(self, params: dict, p: np.ndarray) -> np.ndarray:
        dx, dz = _length(p[:, 0], p[:, 1]) - params["radius"], np.abs(p[:, 2]) - params["half_height"]
        return np.minimum(np.maximum(dx, dz), 0) + _length(np.maximum(dx, 0), np.maximum(dz, 0))

    def surface(self, params: dict, n: int, rng: np.random.Generator) -> np.ndarray:
        r, h = params["radius"], params["half_height"]
        side = rng.random(n) < 2 * h / (2 * h + r)  # lateral 4 pi r h vs caps 2 pi r^2
        phi, k = rng.uniform(0, 2 * np.pi, n), int((~side).sum())
        p = np.stack([r * np.cos(phi), r * np.sin(phi), rng.uniform(-h, h, n)], axis=1)
        p[~side] = _disc(k, r, 0.0, rng) + np.c_[np.zeros((k, 2)), h * rng.choice([-1.0, 1.0], size=k)]
        return p

    def volume(self, params: dict) -> float:
        return 2 * np.pi * params["radius"] ** 2 * params["half_height"]

    def bounding_radius(self, params: dict) -> float:
        return float(np.hypot(params["radius"], params["half_height"]))

    def proportions(self, rng: np.random.Generator) -> dict:
        return {"radius": 1.0, "half_height": float(np.exp(rng.uniform(np.log(0.25), np.log(2.5))))}

    def look(self, params: dict) -> tuple[str, str]:
        return _aspect_word(params["half_height"] / params["radius"], 1.3, 0.6), self.name  # height / diameter


class Torus(Solid):
    name = "torus"

    def sdf(self, params: dict, p: np.ndarray) -> np.ndarray:
        return _length(_length(p[:, 0], p[:, 1]) - params["major_radius"], p[:, 2]) - params["minor_radius"]

    def surface(self, params: dict, n: int, rng: np.random.Generator) -> np.ndarray:
        big, r = params["major_radius"], params["minor_radius"]
        thetas = np.empty(0)
        while len(thetas) < n:  # the tube angle theta has density (R + r cos theta): rejection sampling
            theta = rng.uniform(0, 2 * np.pi, 2 * n)
            keep = rng.random(2 * n) * (big + r) < big + r * np.cos(theta)
            thetas = np.concatenate([thetas, theta[keep]])
        theta, phi = thetas[:n], rng.uniform(0, 2 * np.pi, n)
        ring = big + r * np.cos(theta)
        return np.stack([ring * np.cos(phi), ring * np.sin(phi), r * np.sin(theta)], axis=1)

    def volume(self, params: dict) -> float:
        return 2 * np.pi**2 * params["major_radius"] * params["minor_radius"] ** 2

    def bounding_radius(self, params: dict) -> float:
        return params["major_radius"] + params["minor_radius"]

    def proportions(self, rng: np.random.Generator) -> dict:
        return {"major_radius": 1.0, "minor_radius": float(rng.uniform(0.15, 0.6))}

    def look(self, params: dict) -> tuple[str, str]:
        ratio = params["minor_radius"] / params["major_radius"]
        return "thin" if ratio < 0.3 else "thick" if ratio > 0.45 else "", self.name


class Cone(Solid):
    """Base disc of ``radius`` at z = -height/2, apex at z = +height/2."""

    name = "cone"

    def sdf(self, params: dict, p: np.ndarray) -> np.ndarray:
        rho, z = _length(p[:, 0], p[:, 1]), p[:, 2]
        r, h = params["radius"], params["height"] / 2
        cax = rho - np.minimum(rho, np.where(z < 0, r, 0.0))
        cay = np.abs(z) - h
        k2x, k2y = -r, 2 * h  # apex minus base rim, in (rho, z)
        along = np.clip(((0 - rho) * k2x + (h - z) * k2y) / (k2x**2 + k2y**2), 0, 1)
        cbx, cby = rho + k2x * along, z - h + k2y * along
        sign = np.where((cbx < 0) & (cay < 0), -1.0, 1.0)
        return sign * np.sqrt(np.minimum(cax**2 + cay**2, cbx**2 + cby**2))

    def surface(self, params: dict, n: int, rng: np.random.Generator) -> np.ndarray:
        r, height = params["radius"], params["height"]
        slant = np.hypot(r, height)
        side = rng.random(n) < slant / (slant + r)  # lateral pi r l vs base pi r^2
        t, phi = np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)  # t: fraction of the way from the apex
        p = np.stack([t * r * np.cos(phi), t * r * np.sin(phi), height / 2 - t * height], axis=1)
        p[~side] = _disc(int((~side).sum()), r, -height / 2, rng)
        return p

    def volume(self, params: dict) -> float:
        return np.pi * params["radius"] ** 2 * params["height"] / 3

    def bounding_radius(self, params: dict) -> float:
        return float(np.hypot(params["radius"], params["height"] / 2))

    def proportions(self, rng: np.random.Generator) -> dict:
        return {"radius": 1.0, "height": float(np.exp(rng.uniform(np.log(0.6), np.log(4.0))))}

    def look(self, params: dict) -> tuple[str, str]:
        return _aspect_word(params["height"] / (2 * params["radius"]), 1.2, 0.6), self.name


KINDS: dict[str, Solid] = {s.name: s for s in (Sphere(), Box(), Cylinder(), Torus(), Cone())}
SOLIDS = tuple(KINDS)
"""Solid names in class-id order."""


def solid_of(name: str) -> Solid:
    if name not in KINDS:
        raise ValueError(f"unknown solid {name!r}; expected one of {SOLIDS}")
    return KINDS[name]


# ---------------------------------------------------------------- posed solids


def to_local(params: dict, points: np.ndarray) -> np.ndarray:
    """World points (M, 3) -> the solid's frame: R^T (p - c), written for row vectors."""
    return (np.asarray(points, np.float64) - np.asarray(params["center"])) @ np.asarray(params["rotation"])


def sdf(solid: str, params: dict, points: np.ndarray) -> np.ndarray:
    """Signed distance (M,) of world points (M, 3) to a posed solid; negative inside."""
    return solid_of(solid).sdf(params, to_local(params, points))


def inside(solid: str, params: dict, points: np.ndarray) -> np.ndarray:
    """bool (M,): which world points (M, 3) lie inside (or on) the posed solid."""
    return sdf(solid, params, points) <= 0


def volume(solid: str, params: dict) -> float:
    """Closed-form volume (for tests and captions)."""
    return solid_of(solid).volume(params)


def surface(solid: str, params: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) world points uniform by area on the posed solid."""
    return solid_of(solid).surface(params, n, rng) @ np.asarray(params["rotation"]).T + np.asarray(params["center"])


def caption(solid: str, params: dict) -> str:
    """A short description such as "a small tall cylinder" or "a large thick torus"."""
    kind = solid_of(solid)
    radius = kind.bounding_radius(params)
    size = "small" if radius < 0.58 else "medium" if radius < 0.72 else "large"
    look, noun = kind.look(params)
    return " ".join(w for w in ("a", size, look, noun) if w)
