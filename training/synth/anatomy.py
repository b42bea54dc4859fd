"""Procedural chest-radiograph anatomy, rendered in display space (air dark, bone bright, [0, 1]).

Why this way: a detector trained on synthetic films must not learn shortcuts such as "dark image = lesion"
or "lesion = the only structure with edges", nor the look of a schematic. So the background carries the
structures that make real pneumothorax hard to see, with anatomical outlines: lungs with narrow apices,
sharp costophrenic angles and a medial border that follows the mediastinum and the cardiac silhouette;
domed hemidiaphragms (right higher) with a gastric bubble; shoulders, rounded soft tissue and breast
shadows; irregular ribs, clavicles, scapulae and spine (`bones.py`); vessel markings that are clear at the
hila and fade towards the periphery (exactly where a pneumothorax sits, and absent inside it).

Speed: everything smooth (body, lungs, heart, bones, exposure) is evaluated analytically on a 256-pixel
grid and upsampled; the vessel markings and fine tissue mottle are drawn at up to 512 pixels. Only noise
and the lesion (see `lesions.py`) are made at full resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from training.synth import bones
from training.synth.bones import soft as _soft

LOW_RES = 256
MARKINGS_RES = 512
SIDES = ("image_left", "image_right")  # image-left is the patient's right on a PA film


@dataclass(frozen=True)
class Pose:
    """Where the patient sits on the detector: scale about the centre, shift (fractions), rotation (rad)."""

    scale: float
    shift: tuple[float, float]
    angle: float

    def to_patient(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates (fractions of the width) to canonical patient coordinates."""
        x, y = u - 0.5 - self.shift[0], v - 0.5 - self.shift[1]
        c, s = math.cos(-self.angle), math.sin(-self.angle)
        return (c * x - s * y) / self.scale + 0.5, (s * x + c * y) / self.scale + 0.5

    def to_image(self, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical patient coordinates to image coordinates (fractions)."""
        x, y = (p - 0.5) * self.scale, (q - 0.5) * self.scale
        c, s = math.cos(self.angle), math.sin(self.angle)
        return c * x - s * y + 0.5 + self.shift[0], s * x + c * y + 0.5 + self.shift[1]


@dataclass
class Anatomy:
    """A rendered chest without lesions and without noise, at the output size.

    `base` has no vessel markings; `markings` is added on top except where a pneumothorax removes them.
    `lung_side` labels the aerated lung fields: 0 outside, 1 image-left lung, 2 image-right lung.
    """

    base: np.ndarray
    markings: np.ndarray
    lung_side: np.ndarray
    pose: Pose
    params: dict


def _geometry(rng: np.random.Generator) -> dict:
    """Per-patient anatomical variation in canonical patient coordinates (fractions of the field).

    Two-element tuples are (image-left, image-right): the image-left side is the patient's right, whose
    hemidiaphragm sits higher and whose lung is larger (the left lung is notched by the heart).
    """
    lat = rng.uniform(0.41, 0.45)
    dome_r = rng.uniform(0.58, 0.64)
    heart_r, heart_l = rng.uniform(0.085, 0.115), rng.uniform(0.22, 0.28)
    g = {
        "apex_q": (rng.uniform(0.06, 0.095), rng.uniform(0.06, 0.095)), "apex_d": rng.uniform(0.16, 0.20),
        "lat_max": (lat, lat * rng.uniform(0.96, 1.01)), "dome_top": (dome_r, dome_r + rng.uniform(0.015, 0.045)),
        "cpa_drop": rng.uniform(0.10, 0.16), "dome_c": rng.uniform(0.18, 0.24), "medi_w": rng.uniform(0.045, 0.06),
        "heart": (heart_r, heart_l, rng.uniform(0.12, 0.14), rng.uniform(0.3, 0.5)),
        "knob": (rng.uniform(0.045, 0.06), rng.uniform(0.03, 0.04)), "trachea_w": rng.uniform(0.012, 0.016),
        "hilum_q": (rng.uniform(0.40, 0.45), rng.uniform(0.38, 0.43)),
        "neck_w": rng.uniform(0.08, 0.10), "shoulder_drop": rng.uniform(0.16, 0.24),
        "chest_w": lat + rng.uniform(0.04, 0.07), "arm_w": rng.uniform(0.06, 0.12), "arm_gap": rng.uniform(0.0, 0.04),
        "breasts": bool(rng.random() < 0.35), "breast": (rng.uniform(0.27, 0.33), rng.uniform(0.50, 0.56),
                                                         rng.uniform(0.13, 0.18), rng.uniform(0.04, 0.08)),
        "bubble": bool(rng.random() < 0.7), "bubble_geo": (rng.uniform(0.12, 0.2), rng.uniform(0.05, 0.08),
                                                            rng.uniform(0.03, 0.05)),
        "marking_reach": rng.uniform(0.20, 0.28), "marking_amp": rng.uniform(0.10, 0.15),
        "lung_grey": rng.uniform(0.22, 0.32), "tissue": rng.uniform(0.55, 0.66), "heel": rng.uniform(-0.06, 0.06),
        "gamma": rng.uniform(0.8, 1.25), "black": rng.uniform(0.0, 0.06), "white": rng.uniform(0.9, 1.0),
    }
    g["cpa_q"] = tuple(t + g["cpa_drop"] + rng.uniform(-0.01, 0.02) for t in g["dome_top"])
    g["heart_q"] = g["dome_top"][1] + rng.uniform(0.01, 0.04) - _heart_axes(g)[2]  # sits on the diaphragm
    g["knob_q"] = min(g["heart_q"] - _heart_axes(g)[2], g["hilum_q"][1]) - rng.uniform(0.07, 0.1)
    g["bones"] = bones.bone_geometry(rng, max(g["lat_max"]))
    return g


def _heart_axes(g: dict) -> tuple[float, float, float]:
    """Semi-axes (a, b) of the tilted cardiac ellipse from its border distances, plus its vertical half-extent."""
    right, left, b, tilt = g["heart"]
    half_w = (right + left) / 2
    a = math.sqrt(max(half_w**2 - (b * math.sin(tilt)) ** 2, 1e-4)) / math.cos(tilt)
    return a, b, math.sqrt((a * math.sin(tilt)) ** 2 + (b * math.cos(tilt)) ** 2)


def _mediastinum(p: np.ndarray, q: np.ndarray, g: dict) -> tuple[np.ndarray, np.ndarray]:
    """Signed margins (positive inside) of the cardiac silhouette and of the whole mediastinum.

    The heart is a tilted ellipse offset to the image right (patient left): right border just right of the
    spine, the left ventricle bulging towards the image right and down onto the diaphragm. Above it the
    superior mediastinum, with the aortic knob bulging into the upper left (image-right) lung.
    """
    right, left, _, tilt = g["heart"]
    a, b, _ = _heart_axes(g)
    x, y = p - (0.5 + (left - right) / 2), q - g["heart_q"]
    xr, yr = x * math.cos(tilt) + y * math.sin(tilt), -x * math.sin(tilt) + y * math.cos(tilt)
    heart = (1.0 - np.sqrt((xr / a) ** 2 + (yr / b) ** 2)) * min(a, b)
    d = np.abs(p - 0.5)
    column = g["medi_w"] + 0.04 * np.clip(q - 0.2, 0.0, 0.3) - d  # continues behind the heart (spine, aorta)
    knob = g["knob"][1] - np.hypot(p - 0.5 - g["knob"][0], (q - g["knob_q"]) * 0.9)
    return heart, np.maximum(np.maximum(heart, column), np.maximum(knob, _cardiac_waist(p, q, g)))


def _cardiac_waist(p: np.ndarray, q: np.ndarray, g: dict) -> np.ndarray:
    """The mediastinum widening from the aortic knob down to the heart (pulmonary trunk, left atrial
    appendage on the image right; superior vena cava / right atrium on the image left), so the cardiac
    silhouette merges into the mediastinum instead of hanging from it like a ball."""
    right, left, _, _ = g["heart"]
    t = np.clip((q - g["knob_q"]) / (g["heart_q"] - g["knob_q"]), 0.0, 1.0)
    edge_l = g["knob"][0] + 0.5 * g["knob"][1] + (0.75 * left - g["knob"][0] - 0.5 * g["knob"][1]) * t**1.5
    edge_r = g["medi_w"] + (0.9 * right - g["medi_w"]) * t**2
    x = p - 0.5
    return np.minimum(np.minimum(edge_l - x, x + edge_r), np.minimum(q - g["knob_q"], g["heart_q"] + 0.02 - q))


def _dome(ds: np.ndarray, g: dict, side: int) -> np.ndarray:
    """Hemidiaphragm height (q) across one side: a dome peaking mid-lung, falling steeply to a sharp
    lateral costophrenic angle and gently towards the cardiophrenic angle medially."""
    curv = (g["cpa_q"][side] - g["dome_top"][side]) / (g["lat_max"][side] - g["dome_c"]) ** 2
    off = ds - g["dome_c"]
    return g["dome_top"][side] + curv * off * off * np.where(off < 0, 0.6, 1.0)


def _lung_margins(p: np.ndarray, q: np.ndarray, g: dict, medi: np.ndarray) -> list[np.ndarray]:
    """Signed margins (patient units, positive inside) of the two lung fields, image-left then image-right.

    Intersection of: a rounded narrow apex, a lateral wall that widens to the base, the dome below and
    the outside of the mediastinum/heart medially; min() keeps the costophrenic angles sharp.
    """
    margins = []
    for side, sign in ((0, -1.0), (1, 1.0)):
        ds = sign * (p - 0.5)
        apex, lat = g["apex_q"][side], g["lat_max"][side]
        t = np.clip((q - apex) / (g["cpa_q"][side] - apex) / 0.7, 0.0, 1.0)
        lateral = g["apex_d"] + (lat - g["apex_d"]) * np.sin(0.5 * math.pi * t) ** 0.55 - ds
        top = (q - apex - 4.0 * (ds - g["apex_d"]) ** 2) * 0.7
        dome = _dome(ds, g, side) - q
        margins.append(np.minimum(np.minimum(lateral, top), np.minimum(dome, np.minimum(-medi - 0.004, ds - 0.02))))
    return margins


def _body(p: np.ndarray, q: np.ndarray, g: dict) -> tuple[np.ndarray, np.ndarray]:
    """Soft-tissue membership and relative thickness: neck, sloping shoulders, a barrel-shaped torso and the
    upper arms beside it (a faint axillary gap between), each denser in its middle like a cylinder."""
    d = np.abs(p - 0.5)
    shoulder_q = -0.04 + g["shoulder_drop"] * np.clip((d - g["neck_w"]) / 0.4, 0.0, 1.0) ** 1.3
    width = g["chest_w"] * (0.93 + 0.07 * np.sin(math.pi * np.clip((q - 0.05) / 0.95, 0.0, 1.0)))
    torso = _soft(np.minimum(width - d, (q - shoulder_q) * 0.8), 0.012)
    inner, outer = width + g["arm_gap"], width + g["arm_gap"] + g["arm_w"]
    arm_x = np.clip((d - inner) / (outer - inner), 0.0, 1.0)
    arm = _soft(np.minimum(d - inner, outer - d), 0.01) * _soft(q - shoulder_q, 0.02) * _soft(0.62 - q, 0.06)
    body = np.maximum(np.maximum(torso, 0.85 * arm), _soft(g["neck_w"] - d, 0.01))
    thickness = np.maximum(np.sqrt(np.clip(1.0 - (d / width) ** 2, 0.0, 1.0)) * torso,
                           0.6 * np.sqrt(np.clip(1.0 - (2.0 * arm_x - 1.0) ** 2, 0.0, 1.0)) * arm)
    return body, thickness


def _abdomen(p: np.ndarray, q: np.ndarray, g: dict, mottle: np.ndarray) -> np.ndarray:
    """Density below the diaphragm: liver/spleen brighter downwards, bowel mottle, gastric air bubble."""
    ds = np.abs(p - 0.5)
    blend = _soft(p - 0.5, 0.04)  # the two domes meet smoothly under the heart
    dome = (1.0 - blend) * _dome(ds, g, 0) + blend * _dome(ds, g, 1)
    dome = np.minimum(dome, max(g["dome_top"]) + 0.01)  # under the heart the abdomen does not dip
    below = np.clip(q - dome, 0.0, 0.3)
    dens = _soft(q - dome, 0.006) * (0.16 + 0.25 * below + 0.025 * mottle)
    if g["bubble"]:
        bd, rx, ry = g["bubble_geo"]
        dome_there = _dome(np.full(1, bd), g, 1)[0]
        cq = dome_there + ry + 0.004
        r = np.hypot((p - 0.5 - bd) / rx, (q - cq) / ry)
        dens -= 0.16 * _soft(1.0 - r, 0.06) * _soft(cq + 0.3 * ry - q, 0.003)
    return dens


def _breasts(p: np.ndarray, q: np.ndarray, g: dict) -> np.ndarray:
    """Breast shadows over the lower lungs (some images): sharp inferior edge, fading upwards."""
    if not g["breasts"]:
        return np.zeros_like(p)
    bd, bq, rx, amp = g["breast"]
    ry = rx * 0.7
    r = np.hypot((np.abs(p - 0.5) - bd) / rx, (q - bq) / ry)
    fade = np.clip((q - bq + 1.6 * ry) / (1.6 * ry), 0.0, 1.0) ** 1.5
    return amp * _soft((1.0 - r) * ry, 0.006) * fade


def _airway(p: np.ndarray, q: np.ndarray, g: dict) -> np.ndarray:
    """Trachea down to the carina and the two main bronchi (right steeper), as lucent bands."""
    carina = g["knob_q"] + 0.05
    w = g["trachea_w"]
    out = _soft(w - np.abs(p - 0.5 + 0.004), 0.004) * _soft(carina - q, 0.01)
    for sign, angle in ((-1.0, 0.95), (1.0, 0.6)):
        dx, dy = sign * math.cos(angle) * 0.09, math.sin(angle) * 0.09
        t = np.clip(((p - 0.5) * dx + (q - carina) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        dist = np.hypot(p - 0.5 - t * dx, q - carina - t * dy)
        out = np.maximum(out, _soft(0.8 * w - dist, 0.004) * (1.0 - 0.6 * t))
    return out


def _hila(g: dict) -> list[tuple[float, float, float]]:
    """(x, y, sign) of the two hila in patient coordinates, just lateral to the mediastinal border."""
    right, left, _, _ = g["heart"]
    return [(0.5 - max(g["medi_w"], right * 0.9) - 0.035, g["hilum_q"][0], -1.0),
            (0.5 + max(g["medi_w"] + 0.03, left * 0.45) + 0.03, g["hilum_q"][1], 1.0)]


def _vessel_segments(rng: np.random.Generator, g: dict) -> np.ndarray:
    """Branching vessel trees from each hilum: upper-lobe vessels run up and out, lower-lobe ones down and
    out (and bigger), each branch thinner and shorter. Rows: x0, y0, x1, y1, width (patient units).

    Grown one generation at a time with array operations (all branches of a level at once) for speed.
    """
    roots = []
    for hx, hy, sign in _hila(g):
        for angle in np.linspace(-1.35, 1.3, 9):
            roots.append((hx, hy, math.atan2(math.sin(angle), sign * math.cos(angle)), 0.011 * (1.15 if angle > 0 else 0.9)))
    x, y, direction, width = (np.array(v) for v in zip(*roots))
    x, y = x + rng.normal(0, 0.01, x.size), y + rng.normal(0, 0.02, y.size)
    direction = direction + rng.normal(0, 0.1, x.size)
    levels = []
    for depth in range(6):
        length = rng.uniform(0.03, 0.06, x.size) * (0.82**depth)
        direction = direction + rng.normal(0.0, 0.12, x.size)
        x2, y2 = x + length * np.cos(direction), y + length * np.sin(direction)
        levels.append(np.stack([x, y, x2, y2, width], axis=1))
        turn = rng.uniform(0.12, 0.45, (2, x.size)) * np.array([[-1.0], [1.0]])
        x, y, width = np.tile(x2, 2), np.tile(y2, 2), np.tile(width * 0.72, 2)
        direction = (direction + turn).ravel()
    return np.concatenate(levels)


def _markings(rng: np.random.Generator, n: int, pose: Pose, g: dict, weight_lr: np.ndarray) -> np.ndarray:
    """Vessel markings plus band-pass parenchymal texture, clear at the hila and fading to the periphery.

    `weight_lr` (lung membership times the hilar fade, computed on the smooth grid) confines and fades them.
    """
    canvas = np.zeros((n, n), dtype=np.float32)
    seg = _vessel_segments(rng, g)
    ax, ay = pose.to_image(seg[:, 0], seg[:, 1])
    bx, by = pose.to_image(seg[:, 2], seg[:, 3])
    pts = np.round(np.stack([ax, ay, bx, by], axis=1) * n * 16).astype(np.int32).tolist()
    thick = np.maximum(1, np.round(seg[:, 4] * pose.scale * n)).astype(int).tolist()
    value = np.minimum(1.0, 0.35 + seg[:, 4] / 0.011).tolist()
    for (x0, y0, x1, y1), t, c in zip(pts, thick, value):
        cv2.line(canvas, (x0, y0), (x1, y1), c, t, cv2.LINE_AA, shift=4)
    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.9 * n / 512)
    noise = rng.standard_normal((n, n), dtype=np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 1.2 * n / 512) - cv2.GaussianBlur(noise, (0, 0), 3.5 * n / 512)
    canvas += np.maximum(texture, 0.0) * 0.9
    weight = cv2.resize(weight_lr, (n, n), interpolation=cv2.INTER_LINEAR)
    return (g["marking_amp"] * weight * canvas).astype(np.float32)


def _marking_weight(p: np.ndarray, q: np.ndarray, g: dict, lung: np.ndarray) -> np.ndarray:
    """Where markings show: inside the lung, strongest at the hila and fading (not to zero) peripherally."""
    hilum = np.minimum(*[np.hypot(p - hx, q - hy) for hx, hy, _ in _hila(g)])
    return (lung * (0.15 + 0.85 * np.exp(-hilum / g["marking_reach"]))).astype(np.float32)


def _pose(rng: np.random.Generator) -> Pose:
    """Patient size and placement on the detector (scale, shift, small rotation)."""
    return Pose(scale=float(rng.uniform(0.88, 1.04)), shift=(float(rng.uniform(-0.035, 0.035)),
                float(rng.uniform(-0.03, 0.04))), angle=float(rng.uniform(-0.05, 0.05)))


def _low_res_image(rng: np.random.Generator, n: int, pose: Pose, g: dict) -> tuple[np.ndarray, list, np.ndarray]:
    """The smooth chest (everything but the markings) on an n x n grid, the per-side lung memberships and
    the marking weight."""
    u = (np.arange(n, dtype=np.float32) + 0.5) / n
    p, q = pose.to_patient(*np.meshgrid(u, u))
    body, thickness = _body(p, q, g)
    _, medi_m = _mediastinum(p, q, g)
    margins = _lung_margins(p, q, g, medi_m)
    lungs = [_soft(m, 0.003) for m in margins]
    lung = np.maximum(lungs[0], lungs[1])
    depth = np.clip(np.maximum(margins[0], margins[1]) / 0.06, 0.0, 1.0)
    mottle = cv2.resize(rng.standard_normal((12, 12)).astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC)
    soft_tissue = g["tissue"] * (0.62 + 0.38 * thickness)
    apex = np.exp(-(((q - min(g["apex_q"])) / 0.1) ** 2))
    lung_val = g["lung_grey"] + 0.07 * apex + 0.08 * (1.0 - depth) + 0.03 * np.clip((q - 0.45) / 0.2, 0.0, 1.0)
    medi = _soft(medi_m, 0.008) * (0.07 + 0.04 * np.clip(medi_m / 0.08, 0.0, 1.0))  # denser where thicker
    img = 0.04 + body * soft_tissue
    img = img * (1.0 - lung) + lung * lung_val
    img += body * (1.0 - lung) * np.maximum(medi, _abdomen(p, q, g, mottle))
    img -= 0.11 * _airway(p, q, g)
    hila = sum(np.exp(-((p - hx) / 0.025) ** 2 - ((q - hy) / 0.05) ** 2) for hx, hy, _ in _hila(g))
    img += body * (0.05 * hila * lung + _breasts(p, q, g))
    img += body * bones.skeleton(p, q, g["bones"], lung)
    img *= 1.0 + g["heel"] * (q - 0.5)
    img += 0.004 * cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32), (0, 0), 1.0)
    img = g["black"] + (g["white"] - g["black"]) * np.clip(img, 0.0, 1.0) ** g["gamma"]
    return img.astype(np.float32), lungs, _marking_weight(p, q, g, lung)


def _flatten(value):
    """Tuples and nested dicts of the geometry as JSON-friendly values."""
    if isinstance(value, dict):
        return {k: _flatten(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def render_anatomy(rng: np.random.Generator, size: int) -> Anatomy:
    """Render one chest at `size` x `size`: analytic layers at 256 px, markings at <= 512 px, upsampled."""
    g = _geometry(rng)
    pose = _pose(rng)
    n = min(LOW_RES, size)
    img, lungs, weight = _low_res_image(rng, n, pose, g)
    m = min(MARKINGS_RES, size)
    markings = _markings(rng, m, pose, g, weight)
    base = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    if m != size:
        markings = cv2.resize(markings, (size, size), interpolation=cv2.INTER_LINEAR)
    side = np.zeros((size, size), dtype=np.uint8)
    for label, lung_i in ((1, lungs[0]), (2, lungs[1])):
        side[cv2.resize(lung_i, (size, size), interpolation=cv2.INTER_LINEAR) > 0.5] = label
    return Anatomy(base=base, markings=markings, lung_side=side, pose=pose, params=_flatten(g))
