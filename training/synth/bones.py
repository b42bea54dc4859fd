"""The bony thorax of the synthetic chest: posterior and anterior ribs, clavicles, scapulae, humeral heads, spine.

Why it matters: on a real film the edges that compete with a pneumothorax line are rib cortices (posterior
ribs crossing the lateral lung, where most pneumothoraces sit), the medial scapular border overlapping the
upper lateral lung and the clavicles at the apex. Evenly spaced identical bands would let a model learn to
ignore them by their regularity, so every rib gets its own spacing, curvature, width, wiggle and density.

All functions work in canonical patient coordinates (p across, q down, fractions of the field) on the low-
resolution grid and return display-space density increments (bone is bright).
"""

from __future__ import annotations

import math

import numpy as np

N_POSTERIOR = 10
N_ANTERIOR = 6


def soft(margin: np.ndarray, edge: float) -> np.ndarray:
    """Soft membership from a signed margin (positive inside), so edges are smooth before upsampling."""
    return (0.5 + 0.5 * np.tanh(margin / edge)).astype(np.float32)


def bone_geometry(rng: np.random.Generator, lat_max: float) -> dict:
    """Per-patient bone variation: rib levels with irregular spacing, per-rib curvature/width/density jitter."""
    step = rng.uniform(0.056, 0.064)
    gaps = step * (0.82 + 0.045 * np.arange(N_POSTERIOR)) * rng.uniform(0.92, 1.08, N_POSTERIOR)
    levels = rng.uniform(0.045, 0.07) + np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    return {
        "rib_q": tuple(float(v) for v in levels),
        "rib_bend": tuple(float(v) for v in (2.6 - 0.13 * np.arange(N_POSTERIOR)) * rng.uniform(0.85, 1.15, N_POSTERIOR)),
        "rib_half": tuple(float(v) for v in rng.uniform(0.014, 0.018, N_POSTERIOR)),
        "rib_gain": tuple(float(v) for v in rng.uniform(0.75, 1.2, N_POSTERIOR)),
        "rib_wiggle": tuple(float(v) for v in rng.uniform(-0.004, 0.004, N_POSTERIOR)),
        "rib_phase": tuple(float(v) for v in rng.uniform(0.0, 2 * math.pi, N_POSTERIOR)),
        "rib_skew": float(rng.uniform(-0.012, 0.012)),  # slight left/right level difference (rotation, posture)
        "ant_q": float(rng.uniform(0.14, 0.19)), "ant_step": float(rng.uniform(0.075, 0.09)),
        "cage_d": lat_max + float(rng.uniform(0.02, 0.035)),
        "clav_q": float(rng.uniform(0.16, 0.2)), "clav_tilt": float(rng.uniform(0.15, 0.35)),
        "clav_len": float(rng.uniform(0.27, 0.33)),
        "scapula": bool(rng.random() < 0.6), "scap_d": float(rng.uniform(0.27, 0.33)),
        "scap_bottom": float(rng.uniform(0.40, 0.50)), "scap_slope": float(rng.uniform(0.05, 0.2)),
        "vert_step": float(step * rng.uniform(0.95, 1.05)),
    }


def _band(q: np.ndarray, centre: np.ndarray, half: np.ndarray | float) -> np.ndarray:
    """A bone cross-section: dense medulla plus brighter cortex at both borders (the inferior a little more)."""
    x = (q - centre) / half
    inside = np.clip(1.0 - x * x, 0.0, 1.0) ** 0.4
    cortex = np.exp(-(((np.abs(x) - 0.85) / 0.2) ** 2)) * (1.0 + 0.3 * (x > 0))
    return 0.7 * inside + 0.3 * cortex


def posterior_ribs(p: np.ndarray, q: np.ndarray, b: dict) -> np.ndarray:
    """Posterior ribs: leave the spine nearly horizontally, arch a little up, then run down laterally.

    The arch tightens for the upper ribs (the first ribs ring the apex) and every rib is jittered, so the
    cage is irregular like a real one. Density fades medially into the spine and ends at the chest wall.
    """
    d = np.abs(p - 0.5)
    side = np.sign(p - 0.5)
    out = np.zeros_like(p)
    lateral = soft(b["cage_d"] - d, 0.012) * soft(d - 0.035, 0.008)
    for k in range(N_POSTERIOR):
        t = np.maximum(d - 0.04, 0.0)
        centre = (b["rib_q"][k] + b["rib_skew"] * side - 0.35 * t + b["rib_bend"][k] * t * t
                  + b["rib_wiggle"][k] * np.sin(t * 25.0 + b["rib_phase"][k]))
        near = np.abs(q - centre) < 0.05  # evaluate the band only near the rib (speed)
        if not near.any():
            continue
        half = b["rib_half"][k] * (1.0 + 0.8 * t)
        out[near] += b["rib_gain"][k] * _band(q[near], centre[near], half[near] if np.ndim(half) else half)
    return out * lateral


def anterior_ribs(p: np.ndarray, q: np.ndarray, b: dict) -> np.ndarray:
    """Faint anterior ribs: from the lateral chest wall down towards the sternum, fading at the cartilage."""
    d = np.abs(p - 0.5)
    out = np.zeros_like(p)
    span = soft(b["cage_d"] - 0.01 - d, 0.012) * soft(d - 0.13, 0.04)
    shape = 0.42 * (b["cage_d"] - d) - 0.5 * (b["cage_d"] - d) ** 2
    for k in range(N_ANTERIOR):
        x = (q - shape - (b["ant_q"] + k * b["ant_step"])) * (1.0 / 0.014)
        out += np.maximum(1.0 - x * x, 0.0)
    return np.sqrt(out) * span


def clavicles(p: np.ndarray, q: np.ndarray, b: dict) -> np.ndarray:
    """Clavicles: medial heads beside the spine, running up and out to the shoulder with a gentle S."""
    d = np.abs(p - 0.5)
    t = d - 0.04
    centre = b["clav_q"] - b["clav_tilt"] * t + 0.25 * t * t - 0.01 * np.sin(t / b["clav_len"] * 2 * math.pi)
    along = soft(t, 0.008) * soft(b["clav_len"] - t, 0.015)
    return _band(q, centre, 0.02 + 0.006 * soft(0.05 - t, 0.02)) * along


def scapulae(p: np.ndarray, q: np.ndarray, b: dict) -> np.ndarray:
    """Scapulae (in some images): a faint plate lateral to a medial border that runs down to the inferior angle."""
    if not b["scapula"]:
        return np.zeros_like(p)
    d = np.abs(p - 0.5)
    border = b["scap_d"] + b["scap_slope"] * (q - 0.12) + 0.35 * np.maximum(q - b["scap_bottom"] + 0.08, 0.0)
    inside = soft(d - border, 0.006) * soft(b["scap_bottom"] - q, 0.02) * soft(q - 0.06, 0.02)
    edge = np.exp(-(((d - border) / 0.006) ** 2)) * soft(b["scap_bottom"] - q, 0.02) * soft(q - 0.08, 0.02)
    return 0.6 * inside + 0.5 * edge


def humeral_heads(p: np.ndarray, q: np.ndarray, b: dict) -> np.ndarray:
    """Humeral heads at the shoulders (often cut off by the field edge)."""
    r = np.hypot(np.abs(p - 0.5) - (b["cage_d"] + 0.09), (q - 0.13) * 1.1)
    return soft(0.06 - r, 0.008) * (0.7 + 0.3 * np.exp(-(((r - 0.055) / 0.006) ** 2)))


def spine(p: np.ndarray, q: np.ndarray, b: dict) -> np.ndarray:
    """Thoracic spine: vertebral bodies separated by darker disc spaces, with paired pedicle ovals."""
    d = np.abs(p - 0.5)
    phase = (q - b["rib_q"][0]) / b["vert_step"]
    frac = phase - np.floor(phase)
    disc = np.exp(-(((frac - 0.5) / 0.09) ** 2))
    body = soft(0.034 - d, 0.005) * (1.0 - 0.55 * disc)
    pedicle = np.exp(-(((d - 0.024) / 0.006) ** 2) - ((frac - 0.2) / 0.16) ** 2)
    return body + 0.6 * pedicle


def skeleton(p: np.ndarray, q: np.ndarray, b: dict, lung: np.ndarray) -> np.ndarray:
    """All bone density increments; ribs show more contrast over aerated lung than over soft tissue."""
    ribs = posterior_ribs(p, q, b) * (0.025 + 0.058 * lung) + anterior_ribs(p, q, b) * (0.012 + 0.016 * lung)
    return (ribs + 0.16 * clavicles(p, q, b) + 0.05 * scapulae(p, q, b) + 0.12 * humeral_heads(p, q, b)
            + 0.05 * spine(p, q, b)).astype(np.float32)
