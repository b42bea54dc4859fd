"""Procedural chest-radiograph anatomy, rendered in display space (air dark, bone bright, [0, 1]).

Why this way: a detector trained on synthetic films must not learn shortcuts such as "dark image = lesion"
or "lesion = the only structure with edges". So the background carries the structures that make real
pneumothorax hard to see: rib edges crossing the lung, clavicles at the apex, lung markings that fade
towards the periphery (exactly where a pneumothorax sits), a dome-shaped diaphragm and noise.

Speed: everything smooth (body, lungs, heart, ribs, exposure) is evaluated analytically on a 256-pixel grid
and upsampled; the vessel markings need finer detail and are drawn at up to 512 pixels. Only noise and the
lesion (see `lesions.py`) are made at full resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

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


def _soft(margin: np.ndarray, edge: float) -> np.ndarray:
    """Soft membership from a signed margin (positive inside), so edges are smooth before upsampling."""
    return (0.5 + 0.5 * np.tanh(margin / edge)).astype(np.float32)


def _lung_margins(p: np.ndarray, q: np.ndarray, g: dict) -> list[np.ndarray]:
    """Signed margins (patient units, positive inside) of the two lung fields, image-left then image-right."""
    margins = []
    for side, sign in ((0, -1.0), (1, 1.0)):
        cx, cy = 0.5 + sign * g["lung_dx"], g["lung_cy"]
        aw, ah = g["lung_w"][side], g["lung_h"]
        r = (np.abs(p - cx) / aw) ** 2.2 + (np.abs(q - cy) / ah) ** 2.2
        outline = (1.0 - r) * 0.5 * min(aw, ah)
        dome = g["dome_q"][side] + 4.5 * (p - cx) ** 2 - q
        medial = sign * (p - 0.5) - (g["medi_w"] + 0.03 * q)
        margin = np.minimum(np.minimum(outline, dome), medial)
        if sign > 0:  # the heart pushes into the image-right (patient left) lung
            hx, hy = g["heart_c"]
            heart = 1.0 - ((p - hx) / g["heart_a"][0]) ** 2 - ((q - hy) / g["heart_a"][1]) ** 2
            margin = np.minimum(margin, -heart * 0.05)
        margins.append(margin)
    return margins


def _ribs_and_clavicles(p: np.ndarray, q: np.ndarray, g: dict, lung: np.ndarray) -> np.ndarray:
    """Posterior ribs as curved bony bands (bright cortex edges), plus the two clavicles."""
    d = np.abs(p - 0.5)
    bone = np.zeros_like(p)
    cage = _soft(g["lung_dx"] + max(g["lung_w"]) + 0.03 - d, 0.01) * _soft(d - 0.03, 0.005)
    for k in range(g["n_ribs"]):
        q0 = g["rib_q0"] + k * g["rib_step"]
        centre = q0 - 0.3 * d + 1.8 * d * d
        half = 0.011 + 0.0012 * k
        x = np.abs(q - centre) / half
        band = np.clip(1.0 - x * x, 0.0, 1.0) ** 0.4
        cortex = np.exp(-(((x - 0.85) / 0.18) ** 2))
        bone += (0.6 * band + 0.4 * cortex) * (0.05 + 0.035 * lung)
    bone *= cage
    for sign in (-1.0, 1.0):
        t = d - 0.05
        centre = g["clav_q"] - 0.22 * t + 0.35 * t * t
        x = np.abs(q - centre) / 0.014
        along = _soft(t, 0.01) * _soft(0.27 - t, 0.02) * _soft(sign * (p - 0.5), 0.01)
        bone += np.clip(1.0 - x * x, 0.0, 1.0) ** 0.5 * 0.13 * along
    return bone


def _markings(rng: np.random.Generator, n: int, pose: Pose, g: dict, lung_lr: np.ndarray) -> np.ndarray:
    """Vessel markings: branching trees from each hilum plus band-pass texture, fading to the periphery."""
    canvas = np.zeros((n, n), dtype=np.float32)
    stack = []
    for sign in (-1.0, 1.0):
        hx, hy = 0.5 + sign * (g["medi_w"] + 0.05), g["lung_cy"] + 0.06
        for angle in np.linspace(-0.6 * math.pi, 0.6 * math.pi, 7):
            direction = (math.pi / 2 - sign * (math.pi / 2 - angle * 0.9)) + rng.normal(0, 0.12)
            stack.append((hx + rng.normal(0, 0.015), hy + rng.normal(0, 0.03), direction, 0.010, 0))
    segments = []
    while stack:  # grow the trees in patient coordinates, then transform and draw all segments at once
        x, y, direction, width, depth = stack.pop()
        length = rng.uniform(0.02, 0.05) * (0.9**depth)
        direction += rng.normal(0.0, 0.15)
        x2, y2 = x + length * math.cos(direction), y + length * math.sin(direction)
        segments.append((x, y, x2, y2, width))
        if depth < 5:
            for turn in (-1, 1):
                stack.append((x2, y2, direction + turn * rng.uniform(0.15, 0.5), width * 0.75, depth + 1))
    seg = np.array(segments, dtype=np.float64)
    ax, ay = pose.to_image(seg[:, 0], seg[:, 1])
    bx, by = pose.to_image(seg[:, 2], seg[:, 3])
    pts = np.round(np.stack([ax, ay, bx, by], axis=1) * n * 16).astype(np.int32).tolist()
    thick = np.maximum(1, np.round(seg[:, 4] * pose.scale * n)).astype(int).tolist()
    value = (seg[:, 4] / 0.010).tolist()
    for (x0, y0, x1, y1), t, c in zip(pts, thick, value):
        cv2.line(canvas, (x0, y0), (x1, y1), c, t, cv2.LINE_AA, shift=4)
    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.8 * n / 512)
    noise = rng.standard_normal((n, n), dtype=np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 1.2 * n / 512) - cv2.GaussianBlur(noise, (0, 0), 3.5 * n / 512)
    texture = np.maximum(texture, 0.0) * 3.0
    u = (np.arange(n, dtype=np.float32) + 0.5) / n
    pp, qq = pose.to_patient(*np.meshgrid(u, u))
    hilum = np.minimum(np.hypot(pp - 0.5 + g["medi_w"] + 0.05, qq - g["lung_cy"] - 0.06),
                       np.hypot(pp - 0.5 - g["medi_w"] - 0.05, qq - g["lung_cy"] - 0.06))
    fade = np.exp(-hilum / g["marking_reach"]).astype(np.float32)
    lung = cv2.resize(lung_lr, (n, n), interpolation=cv2.INTER_LINEAR)
    return (g["marking_amp"] * lung * fade * (canvas * 1.0 + texture * 0.4)).astype(np.float32)


def _geometry(rng: np.random.Generator) -> dict:
    """Per-patient anatomical variation in canonical patient coordinates (fractions of the field)."""
    lung_w = rng.uniform(0.15, 0.18)
    return {
        "lung_dx": rng.uniform(0.19, 0.22), "lung_cy": rng.uniform(0.40, 0.44),
        "lung_w": (lung_w, lung_w * rng.uniform(0.93, 1.02)), "lung_h": rng.uniform(0.28, 0.33),
        "dome_q": (rng.uniform(0.60, 0.66), rng.uniform(0.63, 0.69)), "medi_w": rng.uniform(0.065, 0.08),
        "heart_c": (rng.uniform(0.54, 0.57), rng.uniform(0.60, 0.64)),
        "heart_a": (rng.uniform(0.15, 0.19), rng.uniform(0.12, 0.15)),
        "n_ribs": 10, "rib_q0": rng.uniform(0.10, 0.13), "rib_step": rng.uniform(0.052, 0.06),
        "clav_q": rng.uniform(0.15, 0.19), "marking_reach": rng.uniform(0.16, 0.24),
        "marking_amp": rng.uniform(0.08, 0.12), "lung_grey": rng.uniform(0.24, 0.34),
        "tissue": rng.uniform(0.55, 0.66), "gamma": rng.uniform(0.8, 1.25), "black": rng.uniform(0.0, 0.06),
        "white": rng.uniform(0.9, 1.0),
    }


def render_anatomy(rng: np.random.Generator, size: int) -> Anatomy:
    """Render one chest at `size` x `size`: analytic layers at 256 px, markings at <= 512 px, upsampled."""
    g = _geometry(rng)
    pose = Pose(scale=float(rng.uniform(0.86, 1.04)), shift=(float(rng.uniform(-0.04, 0.04)),
                float(rng.uniform(-0.03, 0.05))), angle=float(rng.uniform(-0.06, 0.06)))
    n = min(LOW_RES, size)
    u = (np.arange(n, dtype=np.float32) + 0.5) / n
    p, q = pose.to_patient(*np.meshgrid(u, u))
    d = np.abs(p - 0.5)
    shoulder = q - 0.03 - 0.22 * np.clip(d / 0.5, 0.0, 1.0) ** 2.5
    body = _soft(1.0 - (d / 0.5) ** 5 - (np.abs(q - 0.66) / 0.7) ** 5, 0.03) * _soft(shoulder, 0.01)
    body = np.maximum(body, _soft(0.09 - d, 0.01) * _soft(q + 0.2, 0.01))  # the neck
    margins = _lung_margins(p, q, g)
    lungs = [_soft(m, 0.004) for m in margins]
    lung = np.maximum(lungs[0], lungs[1])
    depth = np.clip(np.maximum(margins[0], margins[1]) / 0.05, 0.0, 1.0)
    apex = np.exp(-(((q - g["lung_cy"] + g["lung_h"]) / 0.09) ** 2))
    dome = np.where(p < 0.5, g["dome_q"][0], g["dome_q"][1]) + 4.5 * np.maximum(d - g["lung_dx"], 0.0) ** 2
    abdomen = _soft(q - dome, 0.012)
    hx, hy = g["heart_c"]
    heart = _soft(1.0 - ((p - hx) / g["heart_a"][0]) ** 2 - ((q - hy) / g["heart_a"][1]) ** 2, 0.08)
    medi = np.maximum(_soft(g["medi_w"] + 0.03 * q - d, 0.012) * _soft(hy - q, 0.05), heart)
    trachea = _soft(0.016 - d, 0.004) * _soft(0.30 - q, 0.02)
    spine = _soft(0.035 - d, 0.006) * (0.85 + 0.15 * np.cos(q * 2 * math.pi / g["rib_step"]) ** 2)
    img = 0.05 + body * (g["tissue"] + 0.07 * np.clip(1.0 - d / 0.45, 0.0, 1.0))
    lung_dark = g["tissue"] - g["lung_grey"] - 0.08 * apex - 0.06 * (1.0 - depth)
    img -= lung * lung_dark
    img += body * ((1.0 - lung) * (0.14 * medi + 0.2 * abdomen * (1.0 - medi)) + 0.05 * spine - 0.1 * trachea)
    img += body * _ribs_and_clavicles(p, q, g, lung)
    img = g["black"] + (g["white"] - g["black"]) * np.clip(img, 0.0, 1.0) ** g["gamma"]
    m = min(MARKINGS_RES, size)
    markings = _markings(rng, m, pose, g, lung)
    base = cv2.resize(img.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    if m != size:
        markings = cv2.resize(markings, (size, size), interpolation=cv2.INTER_LINEAR)
    side = np.zeros((size, size), dtype=np.uint8)
    for label, lung_i in ((1, lungs[0]), (2, lungs[1])):
        side[cv2.resize(lung_i, (size, size), interpolation=cv2.INTER_LINEAR) > 0.5] = label
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
    return Anatomy(base=base, markings=markings, lung_side=side, pose=pose, params=params)
