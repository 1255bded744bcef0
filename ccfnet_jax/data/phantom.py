"""Synthetic sagittal T2 lumbar-spine phantoms: the built-in data set that needs no download.

`generate_study(index, seed)` returns one study as a data record (the contract of `contracts.md`, "Data records"):

- `image` uint16 `[H, W, 3]`: 3 adjacent sagittal slices (z-1, z, z+1), each min-max scaled to 0..65535;
  native sizes 256..448 px per side, not always square.
- `pixel_spacing_mm` float32 `[2]` (row, col), 0.58..1.2 mm; `points_xy` float32 `[11, 2]` (x, y) native px in the
  object order of `ccfnet_jax.objects` (vertebra point = body centre, disc point = disc centre, rounded to whole
  pixels exactly as the official annotation stores them); `point_valid` bool `[11]` (about 3 % of the studies lack
  the top disc's point, as study88 of the real data does); `disease` int32 `[11]` (1, 0, -1 absent); `tags` `[11]`
  str in the official vocabulary; `study_uid`, `series_uid`, `instance_uid` str.

Anatomy: 5 lumbar bodies (rounded rectangles: cortical rim, marrow with texture), 6 discs (dark annulus, bright
nucleus) from T12-L1 to L5-S1, T12 and T11 above, the sacrum below with a sacral kink, the CSF-filled canal behind the
bodies with the cord / cauda equina, posterior elements, paraspinal muscle, subcutaneous fat and skin, abdomen in front;
lordotic curvature; random scale, position, tilt, field of view and image size; smooth bias field; Rician noise.
Disease changes appearance with a random strength (and ~6 % label noise), so classification is learnable, not trivial:
degenerated discs are darker and lower, bulges (v2) and protrusions / extrusions (v3 / v4) push disc material into the
canal, a Schmorl's node (v5) is a dark notch in an endplate, degenerated vertebrae show endplate signal change (Modic
bands) and anterior osteophyte lips.

Determinism: every random number comes from `numpy.random.Generator`s seeded from (seed, index[, slice]); the array
maths use only +, -, *, /, sqrt, min/max and comparisons (no transcendental ufuncs, whose SIMD versions may differ
between CPUs), so the same (index, seed) gives the same bytes on any machine.

`write_official_layout(root, n_studies, seed)` writes the same studies as DICOM + annotation JSON in the official
Tianchi layout (SPEC §8), so the DICOM reading path can be tested on phantoms; reading them back gives the records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import numpy as np
from pydicom.uid import generate_uid

from ccfnet_jax import objects
from ccfnet_jax.data import dicom, dicom_write

# Fixed salt of every seed sequence (changing it changes every phantom).
_SALT = 20220311
# Official layout: slice gap (mm) between sagittal slices, as in the Tianchi README.
SLICE_GAP_MM = 4.4
# Fraction of studies whose top disc (T12-L1) is not annotated.
MISSING_TOP_DISC_RATE = 0.03
# Fraction of labels whose appearance is drawn from the other class (label noise).
LABEL_NOISE_RATE = 0.06

_SIZES = (256, 288, 320, 352, 384, 416, 448)

# Tissue intensities (arbitrary units, ~0..1) for the two contrasts.
_T2 = dict(air=0.0, soft=0.26, muscle=0.2, fat=0.72, csf=0.92, nerve=0.45, marrow=0.45, cortex=0.06, annulus=0.13,
           nucleus=0.8, post=0.34, abdomen=0.3, vessel=0.04, modic=0.75)
_T1 = dict(air=0.0, soft=0.34, muscle=0.3, fat=0.85, csf=0.1, nerve=0.28, marrow=0.62, cortex=0.05, annulus=0.26,
           nucleus=0.3, post=0.5, abdomen=0.34, vessel=0.04, modic=0.8)

# Segments from the top, heights in mm along the spine (before the per-study scale and jitter).
_BODY_HEIGHT_MM = dict(T11=22.0, T12=23.5, L1=25.0, L2=26.0, L3=26.5, L4=26.5, L5=26.0, S1=26.0, S2=20.0, S3=16.0,
                       S4=13.0)
_DISC_HEIGHT_MM = {"T11-T12": 5.5, "T12-L1": 6.5, "L1-L2": 8.0, "L2-L3": 9.0, "L3-L4": 9.5, "L4-L5": 10.5,
                   "L5-S1": 10.0, "S1-S2": 1.5, "S2-S3": 1.0, "S3-S4": 0.8}
_SEGMENTS = ("T11", "T11-T12", "T12", "T12-L1", "L1", "L1-L2", "L2", "L2-L3", "L3", "L3-L4", "L4", "L4-L5", "L5",
             "L5-S1", "S1", "S1-S2", "S2", "S2-S3", "S3", "S3-S4", "S4")
# Prevalence of disc disease per level (T12-L1..L5-S1) and of vertebral degeneration, at a mean "age".
_DISC_PREVALENCE = (0.22, 0.33, 0.45, 0.55, 0.72, 0.7)
_VERTEBRA_PREVALENCE = 0.8


def _logit(p: float) -> float:
  return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------------------------
# Study parameters
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Segment:
  """One body or disc: centre (mm, image frame: X right, Y down, origin at the image's reference point), local
  axes (unit vectors in the image frame: `u` posterior, `v` caudal), half sizes (mm)."""
  name: str
  is_disc: bool
  centre: np.ndarray  # [2] (X, Y) mm
  u_axis: np.ndarray  # [2]
  v_axis: np.ndarray  # [2]
  half_depth: float
  half_height: float


@dataclasses.dataclass
class PhantomStudy:
  """Everything that defines one phantom study; `record()` and `render_slice()` derive the pixels from it.

  Attributes:
    index, seed: the identity of the study.
    height, width: native image size (px).
    spacing_mm: (row, col) pixel spacing.
    num_slices: slices in the T2 sagittal series; `z_index` the annotated one (0-based, x-descending order).
    lateral_mm: lateral offset of the annotated slice from the mid-sagittal plane.
    points_xy: `[11, 2]` float (x, y) px, whole numbers; `point_valid` `[11]`; `disease` `[11]`; `tags` `[11]`.
    study_uid, t2_series_uid, t1_series_uid, axial_series_uid, t2_instance_uids: deterministic UIDs.
  """
  index: int
  seed: int
  height: int
  width: int
  spacing_mm: tuple[float, float]
  num_slices: int
  z_index: int
  lateral_mm: float
  points_xy: np.ndarray
  point_valid: np.ndarray
  disease: np.ndarray
  tags: list[str]
  study_uid: str
  t2_series_uid: str
  t1_series_uid: str
  axial_series_uid: str
  t2_instance_uids: list[str]
  # Internal drawing parameters.
  _p: dict = dataclasses.field(repr=False, default_factory=dict)

  def instance_uid(self) -> str:
    return self.t2_instance_uids[self.z_index]

  def render_slice(self, k: int, contrast: str = "t2", shape: tuple[int, int] | None = None) -> np.ndarray:
    """Slice `k` (0..num_slices-1, x-descending order) as uint16 `[H, W]` scaled to the full range 0..65535.

    `contrast` 't2' (the labelled series) or 't1' (a decoy); `shape` renders on a coarser grid of the same field of
    view (decoys), default the native size.
    """
    if contrast not in ("t2", "t1"):
      raise ValueError(f"render_slice: contrast must be 't2' or 't1', got {contrast!r}")
    if not 0 <= k < self.num_slices:
      raise ValueError(f"render_slice: slice {k} outside the series of {self.num_slices} slices")
    image = _render(self, lateral_mm=self.lateral_mm + (k - self.z_index) * SLICE_GAP_MM,
                    noise_rng=_rng(self.seed, self.index, 1 if contrast == "t2" else 2, k),
                    tissue=_T2 if contrast == "t2" else _T1, shape=shape)
    return _to_uint16(image)

  def record(self) -> dict:
    """The data record of this study (see the module docstring)."""
    z = self.z_index
    image = np.stack([self.render_slice(k) for k in (z - 1, z, z + 1)], axis=-1)
    return {
        "image": image,
        "pixel_spacing_mm": np.asarray(self.spacing_mm, np.float32),
        "points_xy": self.points_xy.astype(np.float32),
        "point_valid": self.point_valid.copy(),
        "disease": self.disease.astype(np.int32),
        "tags": np.asarray(self.tags, np.str_),
        "study_uid": self.study_uid,
        "series_uid": self.t2_series_uid,
        "instance_uid": self.instance_uid(),
    }


def _rng(seed: int, index: int, stream: int, k: int = 0) -> np.random.Generator:
  """A generator for one (seed, index) study and one stream (0 anatomy, 1 T2 noise, 2 T1 noise, 3 decoys)."""
  return np.random.default_rng([_SALT, seed, index, stream, k])


def _uid(seed: int, index: int, *parts: object) -> str:
  """A deterministic DICOM UID (pydicom's root; SHA-512 of the entropy sources), unique per (seed, index, parts)."""
  return generate_uid(entropy_srcs=["ccfnet-jax lumbar phantom", str(seed), str(index), *map(str, parts)])


def _sample_labels(rng: np.random.Generator) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
  """Disease labels, tags, appearance (the label after label noise) and appearance strength per object."""
  age = rng.standard_normal()
  disease = np.zeros(objects.NUM_OBJECTS, np.int32)
  tags = [""] * objects.NUM_OBJECTS
  looks_diseased = np.zeros(objects.NUM_OBJECTS, bool)
  strength = np.zeros(objects.NUM_OBJECTS, np.float64)
  for level, i in enumerate(objects.DISC_INDICES):
    p = _sigmoid(_logit(_DISC_PREVALENCE[level]) + 0.9 * age)
    sick = rng.random() < p
    if sick:
      kind = rng.choice(["v2", "v3", "v4"], p=[0.47, 0.47, 0.06])
      r = rng.random()
      if r < 0.015:
        tag = "v5"
      elif r < 0.06:
        tag = f"{kind},v5" if rng.random() < 0.6 else f"v5,{kind}"
      else:
        tag = str(kind)
    else:
      tag = "v1"
    tags[i] = tag
  for i in objects.VERTEBRA_INDICES:
    # Vertebral degeneration goes with the discs beside it.
    disc_above, disc_below = objects.DISC_INDICES[i], objects.DISC_INDICES[i + 1]
    sick_discs = sum(objects.binary_disease_label(tags[j]) for j in (disc_above, disc_below))
    p = _sigmoid(_logit(_VERTEBRA_PREVALENCE) + 0.9 * age + 0.5 * (sick_discs - 1))
    tags[i] = "v2" if rng.random() < p else "v1"
  for i in range(objects.NUM_OBJECTS):
    disease[i] = objects.binary_disease_label(tags[i])
    flip = rng.random() < LABEL_NOISE_RATE
    looks_diseased[i] = bool(disease[i]) != flip
    strength[i] = rng.uniform(0.25, 1.0) if looks_diseased[i] else rng.uniform(0.0, 0.4)
  return disease, tags, looks_diseased, strength


def phantom_study(index: int, seed: int = 0) -> PhantomStudy:
  """Samples the parameters of phantom study `index` of set `seed` (both ints >= 0); no pixels yet."""
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"phantom index must be an int >= 0, got {index!r}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"phantom seed must be an int >= 0, got {seed!r}")
  index, seed = int(index), int(seed)
  rng = _rng(seed, index, 0)

  # Image size and pixel spacing.
  height = int(rng.choice(_SIZES))
  if rng.random() < 0.6:
    width = height
  else:
    width = int(np.clip(round(height * rng.choice([0.75, 0.875, 1.125, 1.25, 1.333]) / 16) * 16, 256, 448))
  fov_mm = rng.uniform(260.0, 340.0)
  spacing = float(np.clip(fov_mm / max(height, width), 0.5, 1.2))
  spacing = float(np.float32(round(spacing, 4)))
  row_spacing = col_spacing = spacing
  if rng.random() < 0.05:  # slight anisotropy, as in three real studies
    row_spacing = float(np.float32(round(spacing * (1.0 + rng.uniform(0.0005, 0.002)), 5)))

  # Labels and appearance.
  disease, tags, looks_diseased, strength = _sample_labels(rng)
  point_valid = np.ones(objects.NUM_OBJECTS, bool)
  if rng.random() < MISSING_TOP_DISC_RATE:
    top = objects.INDEX["T12-L1"]
    point_valid[top] = False
    disease[top] = objects.UNKNOWN
    tags[top] = ""

  # Segment heights along the spine (mm).
  scale = rng.uniform(0.86, 1.12)
  heights = {}
  for name in _SEGMENTS:
    if name in _BODY_HEIGHT_MM:
      h = _BODY_HEIGHT_MM[name] * scale * rng.uniform(0.95, 1.05)
      i = objects.INDEX.get(name)
      if i is not None and looks_diseased[i]:
        h *= 1.0 - 0.07 * strength[i]
    else:
      h = _DISC_HEIGHT_MM[name] * scale * rng.uniform(0.88, 1.12)
      i = objects.INDEX.get(objects.canonical_name(name) or "")
      if i is not None:
        h *= 1.0 - (0.45 if looks_diseased[i] else 0.15) * strength[i]
    heights[name] = h
  # Arc length of each segment centre, 0 at the centre of L3.
  ends = np.cumsum([heights[n] for n in _SEGMENTS])
  centres_s = ends - 0.5 * np.array([heights[n] for n in _SEGMENTS])
  centres_s -= centres_s[_SEGMENTS.index("L3")]
  s_of = dict(zip(_SEGMENTS, centres_s))

  # Spine curve in the spine frame (p posterior, q caudal; mm): lordosis + sacral kink, as a slope m(q) = dp/dq.
  q_grid = np.arange(-400.0, 400.0 + 0.25, 0.5)
  k2 = rng.uniform(3.0, 15.0) / 85.0**2
  # Lordosis over the lumbar spine only: straight above T12 and (before the sacral kink) below L5.
  slope = 2.0 * k2 * np.clip(q_grid, s_of["T12"], s_of["L5"]) + rng.uniform(-0.08, 0.08)
  qa, qb = 0.97 * s_of["L5"], 0.97 * s_of["S1"]
  ramp = np.clip((q_grid - qa) / (qb - qa), 0.0, 1.0)
  slope = slope + rng.uniform(0.45, 0.9) * ramp * ramp * (3.0 - 2.0 * ramp)
  p_grid = np.concatenate([[0.0], np.cumsum(0.5 * (slope[1:] + slope[:-1]) * np.diff(q_grid))])
  s_grid = np.concatenate([[0.0], np.cumsum(np.sqrt(1.0 + (0.5 * (slope[1:] + slope[:-1]))**2) * np.diff(q_grid))])
  s_zero = np.interp(0.0, q_grid, s_grid)
  s_grid = s_grid - s_zero
  p_grid = p_grid - np.interp(0.0, q_grid, p_grid)

  # Global tilt (rational parametrisation of the rotation: no trigonometric ufuncs).
  t = rng.uniform(-0.11, 0.11)  # tan(theta / 2), |theta| <~ 12.5 deg
  cos_t, sin_t = (1.0 - t * t) / (1.0 + t * t), 2.0 * t / (1.0 + t * t)

  def to_image(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return p * cos_t + q * sin_t, -p * sin_t + q * cos_t

  depth = scale * rng.uniform(33.0, 40.0)
  segments = []
  for name in _SEGMENTS:
    q = float(np.interp(s_of[name], s_grid, q_grid))
    p = float(np.interp(q, q_grid, p_grid))
    m = float(np.interp(q, q_grid, slope))
    n = math.sqrt(1.0 + m * m)
    u_pq, v_pq = (1.0 / n, -m / n), (m / n, 1.0 / n)
    centre = np.array(to_image(p, q))
    u_axis = np.array(to_image(*u_pq))
    v_axis = np.array(to_image(*v_pq))
    is_disc = "-" in name
    if name.startswith("S"):
      taper = {"S1": 0.95, "S1-S2": 0.9, "S2": 0.82, "S2-S3": 0.75, "S3": 0.68, "S3-S4": 0.62, "S4": 0.56}[name]
    else:
      taper = 1.0
    half_depth = 0.5 * depth * taper * (1.0 if is_disc else rng.uniform(0.96, 1.04))
    segments.append(_Segment(name, is_disc, centre, u_axis, v_axis, half_depth, 0.5 * heights[name]))

  # Place the spine in the image: L3 centre near the middle, every point well inside.
  by_name = {s.name: s for s in segments}
  centres_mm = np.array([by_name[n].centre for n in objects.NAMES])  # [11, 2] (X, Y) mm rel. L3
  cx = rng.uniform(0.42, 0.6) * width
  cy = rng.uniform(0.45, 0.56) * height
  xy = centres_mm / np.array([col_spacing, row_spacing]) + np.array([cx, cy])
  margin = np.array([0.08 * width, 0.06 * height])
  low = margin - xy.min(axis=0)
  high = np.array([width, height]) - margin - xy.max(axis=0)
  shift = np.clip(0.0, low, np.maximum(low, high))
  cx, cy = cx + shift[0], cy + shift[1]
  points_xy = np.round(centres_mm / np.array([col_spacing, row_spacing]) + np.array([cx, cy]))
  points_xy[~point_valid] = 0.0

  # Series layout: 5..7 slices, the annotated one in the middle or next to it (never at an edge).
  num_slices = int(rng.integers(5, 8))
  z_index = int(np.clip(num_slices // 2 + rng.integers(-1, 2), 1, num_slices - 2))

  params = dict(
      segments=segments, cx=cx, cy=cy, cos_t=cos_t, sin_t=sin_t, q_grid=q_grid, p_grid=p_grid, slope=slope,
      depth=depth, scale=scale, looks_diseased=looks_diseased, strength=strength, tags=list(tags),
      q_s2=float(np.interp(s_of["S2"], s_grid, q_grid)), q_l1=float(np.interp(s_of["L1"], s_grid, q_grid)),
      canal_mm=scale * rng.uniform(11.0, 16.0), canal_gap_mm=rng.uniform(1.0, 2.5),
      back_mm=scale * rng.uniform(75.0, 110.0), fat_mm=rng.uniform(8.0, 30.0),
      front_mm=scale * rng.uniform(95.0, 190.0), aorta=rng.random() < 0.7,
      tissue_gain={k: rng.uniform(0.85, 1.15) for k in _T2},
      noise_sigma=rng.uniform(0.012, 0.04), bias=rng.uniform(-0.25, 0.25, size=5),
      # Disease geometry.
      herniation_lateral_mm=rng.uniform(-5.0, 5.0, size=objects.NUM_OBJECTS),
      bulge_mm=rng.uniform(1.5, 3.5, size=objects.NUM_OBJECTS), protrusion_mm=rng.uniform(3.0, 6.5, size=11),
      extrusion_mm=rng.uniform(5.0, 9.0, size=11), migration_mm=rng.uniform(-6.0, 6.0, size=11),
      schmorl_side=rng.random(size=11) < 0.5, schmorl_u=rng.uniform(-0.35, 0.35, size=11),
      schmorl_size=rng.uniform(0.7, 1.3, size=11), modic_bright=rng.random(size=11) < 0.65,
      modic_where=rng.integers(0, 3, size=11), osteophyte=rng.uniform(0.5, 1.0, size=(11, 2)),
      cleft=rng.random(size=11) < 0.5,
      texture_seed=int(rng.integers(0, 2**31)),
  )
  study_uid = _uid(seed, index, "study")
  t2_uid = _uid(seed, index, "series", "T2_TSE_SAG")
  return PhantomStudy(
      index=index, seed=seed, height=height, width=width, spacing_mm=(row_spacing, col_spacing),
      num_slices=num_slices, z_index=z_index, lateral_mm=rng.uniform(-1.5, 1.5), points_xy=points_xy,
      point_valid=point_valid, disease=disease, tags=list(tags), study_uid=study_uid, t2_series_uid=t2_uid,
      t1_series_uid=_uid(seed, index, "series", "T1_TSE_SAG"),
      axial_series_uid=_uid(seed, index, "series", "T2_TSE_TRA"),
      t2_instance_uids=[_uid(seed, index, "instance", "T2_TSE_SAG", k) for k in range(num_slices)], _p=params)


def generate_study(index: int, seed: int = 0) -> dict:
  """Phantom study `index` of set `seed` as a data record (see the module docstring); deterministic."""
  return phantom_study(index, seed).record()


# ------------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------------


def _to_uint16(image: np.ndarray) -> np.ndarray:
  """Min-max scales `[H, W]` float to uint16 0..65535 with the DICOM reader's own rule (min -> 0, max -> 65535), so
  that reading the written full-range slice back scales it by exactly 1."""
  return dicom.min_max_uint16(image.astype(np.float64))


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
  """A smooth random field `[H, W]` float32 (std ~0.5): cubic B-spline interpolation of a coarse normal grid with
  about `cells` knots along the longer side."""
  gh = max(2, int(round(cells * height / max(height, width)))) + 3
  gw = max(2, int(round(cells * width / max(height, width)))) + 3
  grid = rng.standard_normal((gh, gw)).astype(np.float32)

  def taps(n: int, g: int) -> tuple[np.ndarray, list[np.ndarray]]:
    pos = 1.0 + (np.arange(n, dtype=np.float32) + 0.5) * np.float32((g - 3) / n)
    i0 = np.minimum(pos.astype(np.int64), g - 3)
    t = pos - i0
    s = 1.0 - t
    weights = [s * s * s / 6.0, (3.0 * t * t * t - 6.0 * t * t + 4.0) / 6.0,
               (-3.0 * t * t * t + 3.0 * t * t + 3.0 * t + 1.0) / 6.0, t * t * t / 6.0]
    return i0 - 1, weights

  iy, wy = taps(height, gh)
  ix, wx = taps(width, gw)
  rows = sum(grid[iy + k] * wy[k][:, None] for k in range(4))  # [H, gw]
  return sum(rows[:, ix + k] * wx[k][None, :] for k in range(4)).astype(np.float32)


class _Canvas:
  """A float32 image with its pixel-centre coordinates in mm (X right, Y down) relative to the spine's L3 centre."""

  def __init__(self, height: int, width: int, row_mm: float, col_mm: float, cx_px: float, cy_px: float):
    self.image = np.zeros((height, width), np.float32)
    self.row_mm, self.col_mm = row_mm, col_mm
    self.x_mm = ((np.arange(width, dtype=np.float64) - cx_px) * col_mm).astype(np.float32)
    self.y_mm = ((np.arange(height, dtype=np.float64) - cy_px) * row_mm).astype(np.float32)
    self.edge_mm = np.float32(1.1 * max(row_mm, col_mm))

  def window(self, centre: np.ndarray, radius_mm: float) -> tuple[slice, slice] | None:
    """Rows and columns within `radius_mm` of `centre` (X, Y mm); None when outside the image."""
    def span(coords: np.ndarray, c: float) -> slice | None:
      lo = int(np.searchsorted(coords, c - radius_mm))
      hi = int(np.searchsorted(coords, c + radius_mm)) + 1
      return slice(lo, hi) if lo < len(coords) else None
    ys = span(self.y_mm, centre[1])
    xs = span(self.x_mm, centre[0])
    return None if ys is None or xs is None else (ys, xs)

  def local(self, win: tuple[slice, slice], centre: np.ndarray, u_axis: np.ndarray, v_axis: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Local coordinates (u, v) mm `[h, w]` of the window's pixels in the frame (centre, u_axis, v_axis)."""
    dx = self.x_mm[win[1]][None, :] - np.float32(centre[0])
    dy = self.y_mm[win[0]][:, None] - np.float32(centre[1])
    u = dx * np.float32(u_axis[0]) + dy * np.float32(u_axis[1])
    v = dx * np.float32(v_axis[0]) + dy * np.float32(v_axis[1])
    return u, v

  def paint(self, win: tuple[slice, slice], alpha: np.ndarray, value) -> None:
    """Composites `value` (scalar or `[h, w]`) with coverage `alpha` `[h, w]` over the window."""
    region = self.image[win]
    region += alpha * (np.float32(value) - region) if np.isscalar(value) else alpha * (value - region)

  def soft(self, sdf: np.ndarray) -> np.ndarray:
    """Coverage from a signed distance (mm, negative inside) with a one-pixel soft edge."""
    return np.clip(0.5 - sdf / self.edge_mm, 0.0, 1.0)


def _rounded_rect_sdf(u: np.ndarray, v: np.ndarray, hu: float, hv: float, r: float) -> np.ndarray:
  r = min(r, hu, hv)
  qx = np.abs(u) - np.float32(hu - r)
  qy = np.abs(v) - np.float32(hv - r)
  outside = np.sqrt(np.maximum(qx, 0.0)**2 + np.maximum(qy, 0.0)**2)
  return outside + np.minimum(np.maximum(qx, qy), 0.0) - np.float32(r)


def _ellipse_sdf(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
  """Approximate signed distance (mm) to an axis-aligned ellipse with half axes a (u) and b (v)."""
  return (np.sqrt((u / np.float32(a))**2 + (v / np.float32(b))**2) - 1.0) * np.float32(min(a, b))


def _background(study: PhantomStudy, tissue: dict, shape: tuple[int, int]) -> dict:
  """The parts of a slice that do not depend on its lateral position (cached per study, contrast and grid)."""
  key = (id(tissue), shape)
  cache = study._p.setdefault("_cache", {})
  if key in cache:
    return cache[key]
  P = study._p
  height, width = shape
  row_mm = study.spacing_mm[0] * study.height / height
  col_mm = study.spacing_mm[1] * study.width / width
  # Pixel centres of a coarser grid cover the same field of view.
  cx = (P["cx"] + 0.5) * width / study.width - 0.5
  cy = (P["cy"] + 0.5) * height / study.height - 0.5
  cv = _Canvas(height, width, row_mm, col_mm, cx, cy)
  T = {k: v * P["tissue_gain"][k] for k, v in tissue.items()}
  tex_rng = np.random.default_rng([_SALT, P["texture_seed"], height, width])
  tex_coarse = _smooth_field(tex_rng, height, width, 6)
  tex_fine = _smooth_field(tex_rng, height, width, 20)
  tex_mid = _smooth_field(tex_rng, height, width, 12)

  # Spine-frame coordinates of every pixel: q along the spine, u posterior distance from the body centre line.
  X, Y = cv.x_mm[None, :], cv.y_mm[:, None]
  cos_t, sin_t = np.float32(P["cos_t"]), np.float32(P["sin_t"])
  p = X * cos_t - Y * sin_t
  q = X * sin_t + Y * cos_t
  q_flat = q.ravel()
  p_c = np.interp(q_flat, P["q_grid"], P["p_grid"]).astype(np.float32).reshape(q.shape)
  m = np.interp(q_flat, P["q_grid"], P["slope"]).astype(np.float32).reshape(q.shape)
  u = (p - p_c) / np.sqrt(1.0 + m * m)
  # The skin and the front of the abdomen follow the spine's curve only in part.
  u_far = p - np.float32(0.35) * p_c
  edge = cv.edge_mm

  def band(lo, hi, coord=u):
    """Coverage of lo <= coord <= hi (arrays or scalars, mm) with soft edges."""
    return np.clip(np.minimum(coord - lo, hi - coord) / edge + 0.5, 0.0, 1.0)

  full = (slice(None), slice(None))
  half_depth = np.float32(0.5 * P["depth"])
  # Torso: soft tissue between the front of the abdomen and the skin of the back.
  back = np.float32(P["back_mm"]) + np.float32(6.0) * tex_coarse
  cv.paint(full, band(-np.float32(P["front_mm"]), back, u_far), T["soft"] * (1.0 + 0.15 * tex_fine))
  # Abdomen in front of the spine: bowel loops (brighter fluid, darker gas) from smooth texture.
  front = np.minimum(band(-np.float32(P["front_mm"]) + 4.0, np.float32(1e3), u_far), band(-1e3, -half_depth - 22.0))
  bowel = np.clip(0.6 + 0.45 * tex_mid + 0.25 * tex_coarse, 0.1, 1.2)
  cv.paint(full, front, T["abdomen"] * bowel)
  # Aorta (flow void) in front of the upper lumbar spine.
  if P["aorta"]:
    above_l4 = np.clip((np.float32(P["q_l1"] + 75.0) - q) / 8.0, 0.0, 1.0)
    cv.paint(full, band(-half_depth - 22.0, -half_depth - 5.0) * above_l4, T["vessel"])
  # Subcutaneous fat, then paraspinal muscle, then the posterior elements (fading below the sacrum).
  canal_front = half_depth + np.float32(P["canal_gap_mm"])
  canal_back = canal_front + np.float32(P["canal_mm"])
  cv.paint(full, band(back - np.float32(P["fat_mm"]), back, u_far), T["fat"] * (1.0 + 0.1 * tex_fine))
  muscle = np.minimum(band(canal_back + 14.0, np.float32(1e3)), band(-1e3, back - np.float32(P["fat_mm"]) - 1.5, u_far))
  cv.paint(full, muscle, T["muscle"] * (1.0 + 0.25 * tex_fine))
  post = band(canal_back - 3.0, canal_back + 14.0) * np.clip((np.float32(P["q_s2"] + 40.0) - q) / 20.0, 0.0, 1.0)
  cv.paint(full, post, T["post"] * (0.8 + 0.4 * np.clip(tex_mid, -1.0, 1.0)))
  # Laminae and spinous processes: one per vertebra, behind the canal and a little below the body's centre.
  for seg in P["segments"]:
    if seg.is_disc or seg.name.startswith("S"):
      continue
    centre = seg.centre + seg.u_axis * float(canal_back + 13.0) + seg.v_axis * (0.3 * seg.half_height)
    win = cv.window(centre, 26.0)
    if win is None:
      continue
    du, dv = cv.local(win, centre, seg.u_axis, seg.v_axis)
    outline = _rounded_rect_sdf(du, dv, 12.0, 0.42 * seg.half_height + 1.5, 3.0)
    cv.paint(win, cv.soft(outline), T["cortex"])
    cv.paint(win, cv.soft(outline + np.float32(1.3)), T["post"] * 1.25 * (1.0 + 0.1 * tex_fine[win]))

  # Smooth multiplicative bias field (stronger towards the receive coil behind the back).
  bx = (cv.x_mm / np.float32(150.0))[None, :]
  by = (cv.y_mm / np.float32(150.0))[:, None]
  c = P["bias"].astype(np.float32)
  bias = 1.0 + c[0] * bx + c[1] * by + c[2] * bx * bx + c[3] * bx * by + c[4] * by * by + np.float32(0.001) * u
  cache[key] = dict(image=cv.image, canvas=cv, u=u, q=q, tex_fine=tex_fine, tex_coarse=tex_coarse,
                    bias=np.clip(bias, 0.4, 1.6), T=T, canal_front=canal_front)
  return cache[key]


def _render(study: PhantomStudy, *, lateral_mm: float, noise_rng: np.random.Generator, tissue: dict,
            shape: tuple[int, int] | None = None) -> np.ndarray:
  """One sagittal slice at `lateral_mm` from the mid-plane: float32 `[H, W]` (before scaling)."""
  P = study._p
  height, width = shape or (study.height, study.width)
  bg = _background(study, tissue, (height, width))
  cv = bg["canvas"]
  cv.image = bg["image"].copy()
  T, u, q, tex_fine, tex_coarse = bg["T"], bg["u"], bg["q"], bg["tex_fine"], bg["tex_coarse"]
  t2 = tissue is _T2
  lat = abs(lateral_mm)
  full = (slice(None), slice(None))

  def band(lo, hi):
    return np.clip(np.minimum(u - lo, hi - u) / cv.edge_mm + 0.5, 0.0, 1.0)

  # Canal: CSF between the posterior longitudinal ligament and the posterior elements, narrower off the mid-plane;
  # it ends in the sacrum.
  canal_front = bg["canal_front"]
  canal_mm = np.float32(P["canal_mm"] * math.sqrt(max(0.0, 1.0 - (lat / 13.0)**2)))
  canal_end = np.clip((np.float32(P["q_s2"]) - q) / 6.0, 0.0, 1.0)
  canal_bright = float(np.clip(1.0 - (lat / 14.0)**2, 0.25, 1.0))
  if canal_mm > 0.5:
    cv.paint(full, band(canal_front, canal_front + canal_mm) * canal_end, T["csf"] * canal_bright)
  # Cord above the conus (about L1), then the cauda equina lying in the back of the sac.
  if lat < 7.0 and canal_mm > 4.0:
    conus = np.clip((np.float32(P["q_l1"] + 8.0) - q) / 6.0, 0.0, 1.0)
    mid = canal_front + 0.5 * canal_mm
    cord = band(mid - 3.5, mid + 3.5) * conus
    roots = band(mid + 0.1 * canal_mm, mid + 0.3 * canal_mm) * (1.0 - conus) * canal_end * np.float32(0.6)
    cv.paint(full, np.maximum(cord, roots) * np.float32(1.0 - lat / 7.0), T["nerve"])

  segments = P["segments"]
  looks, strength, tags = P["looks_diseased"], P["strength"], P["tags"]
  body_shrink = math.sqrt(max(0.0, 1.0 - (lat / 30.0)**2))

  # Discs first (the bodies cover their ends), each reaching into the endplates of its neighbours.
  for seg in segments:
    if not seg.is_disc:
      continue
    i = objects.INDEX.get(objects.canonical_name(seg.name) or "")
    hd = seg.half_depth * body_shrink + 0.8
    hh = seg.half_height + 3.5
    win = cv.window(seg.centre, hd + 12.0 + hh)
    if win is None:
      continue
    du, dv = cv.local(win, seg.centre, seg.u_axis, seg.v_axis)
    cv.paint(win, cv.soft(_rounded_rect_sdf(du, dv, hd, hh, 5.0)), T["annulus"])
    if seg.name.startswith("S") and seg.name != "S1":
      continue
    sick, a = (bool(looks[i]), float(strength[i])) if i is not None else (False, 0.0)
    darken = (1.0 - 0.7 * a) if sick else (1.0 - 0.3 * a)
    shrink = (1.0 - 0.35 * a) if sick else 1.0
    nucleus = cv.soft(_ellipse_sdf(du - np.float32(0.12 * hd), dv, 0.62 * hd * shrink,
                                   max(0.8, 0.33 * seg.half_height * 2.0 * shrink)))
    value = T["nucleus"] * darken if t2 else T["nucleus"]
    cv.paint(win, nucleus, value)
    if i is not None and P["cleft"][i] and not sick and seg.half_height > 3.0:
      cv.paint(win, cv.soft(_rounded_rect_sdf(du, dv, 0.45 * hd, 0.35, 0.3)) * np.float32(0.5), T["annulus"])
    if i is None or not sick:
      continue
    # Disc displacement into the canal, strongest near its lateral position.
    tag = tags[i]
    lateral_gain = max(0.0, 1.0 - ((lateral_mm - P["herniation_lateral_mm"][i]) / 9.0)**2)
    back_edge = np.float32(hd)
    if "v2" in tag:
      b = P["bulge_mm"][i] * (0.5 + 0.5 * a)
      cv.paint(win, cv.soft(_ellipse_sdf(du - back_edge + np.float32(1.0), dv, 1.0 + b, seg.half_height + 1.5)),
               T["annulus"] * 1.3)
    if "v3" in tag or "v4" in tag:
      extrusion = "v4" in tag
      b = (P["extrusion_mm"][i] if extrusion else P["protrusion_mm"][i]) * (0.5 + 0.5 * a) * lateral_gain
      if b > 0.5:
        shift = np.float32(P["migration_mm"][i] if extrusion else 0.0)
        hh_p = max(1.5, 0.45 * seg.half_height * 2.0 * (1.4 if extrusion else 1.0))
        blob = cv.soft(_ellipse_sdf(du - back_edge, dv - shift, 1.0 + b, hh_p))
        cv.paint(win, blob, T["annulus"])
        inner = cv.soft(_ellipse_sdf(du - back_edge - np.float32(0.5), dv - shift, max(0.5, b - 0.5),
                                     max(0.8, hh_p - 1.2)))
        cv.paint(win, inner, T["nucleus"] * (0.55 if t2 else 1.0))

  # Bodies: cortical rim, marrow with texture, then the degeneration features.
  for seg in segments:
    if seg.is_disc:
      continue
    i = objects.INDEX.get(seg.name)
    hd = seg.half_depth * body_shrink
    hh = seg.half_height
    win = cv.window(seg.centre, hd + hh + 8.0)
    if win is None:
      continue
    du, dv = cv.local(win, seg.centre, seg.u_axis, seg.v_axis)
    outer = _rounded_rect_sdf(du, dv, hd, hh, 3.5)
    cv.paint(win, cv.soft(outer), T["cortex"])
    marrow = T["marrow"] * (1.0 + 0.12 * tex_fine[win] + 0.06 * tex_coarse[win])
    sick, a = (bool(looks[i]), float(strength[i])) if i is not None else (False, 0.0)
    if sick:
      marrow = marrow * (1.0 + 0.25 * a * np.clip(tex_fine[win] * 2.0, -1.0, 1.0))
    cv.paint(win, cv.soft(outer + np.float32(1.4)), marrow)
    if i is None or a <= 0.0:
      continue
    # Endplate signal change (Modic) at the upper / lower / both endplates.
    band_mm = (1.5 + 4.5 * a) if sick else 1.5 * a
    where = P["modic_where"][i]
    target = T["modic"] if P["modic_bright"][i] else T["cortex"] * 2.0
    for sign, use in ((-1.0, where in (0, 2)), (1.0, where in (1, 2))):
      if not use:
        continue
      centre_v = np.float32(sign * (hh - 1.4 - 0.5 * band_mm))
      plate = cv.soft(_rounded_rect_sdf(du, dv - centre_v, hd - 2.0, 0.5 * band_mm, 0.8))
      cv.paint(win, plate * np.float32(min(1.0, 0.35 + 0.6 * a)), target)
    # Anterior osteophyte lips at the upper and lower front corners.
    if sick:
      for j, sign in enumerate((-1.0, 1.0)):
        size = (1.0 + 4.0 * a) * P["osteophyte"][i, j]
        lip_u, lip_v = -hd + 0.25 * size, sign * (hh + 0.15 * size)
        lip = _ellipse_sdf(du - np.float32(lip_u), dv - np.float32(lip_v), 0.55 * size + 0.5, 0.8 * size + 0.5)
        cv.paint(win, cv.soft(lip), T["cortex"])
        cv.paint(win, cv.soft(lip + np.float32(1.0)), T["marrow"] * 0.9)

  # Schmorl's nodes: a dark notch in the endplate above or below the disc (tags with v5).
  for i in objects.DISC_INDICES:
    if "v5" not in tags[i] or not looks[i]:
      continue
    below = bool(P["schmorl_side"][i])
    where = _SEGMENTS.index(objects.NAMES[i]) + (1 if below else -1)
    body = segments[where]  # the body below or above the disc
    sign = -1.0 if below else 1.0  # its endplate that faces the disc
    win = cv.window(body.centre, body.half_depth + body.half_height + 4.0)
    if win is None:
      continue
    du, dv = cv.local(win, body.centre, body.u_axis, body.v_axis)
    size = P["schmorl_size"][i] * (0.6 + 0.6 * strength[i])
    nu = np.float32(P["schmorl_u"][i] * body.half_depth)
    nv = np.float32(sign * body.half_height)
    notch = _ellipse_sdf(du - nu, dv - nv, 3.2 * size, 3.4 * size)
    cv.paint(win, cv.soft(notch), T["cortex"])
    cv.paint(win, cv.soft(notch + np.float32(1.0)), T["annulus"] * 1.5)

  # Bias field, then Rician noise.
  image = cv.image * bg["bias"]
  sigma = np.float32(P["noise_sigma"])
  n1 = noise_rng.standard_normal((height, width), dtype=np.float32) * sigma
  n2 = noise_rng.standard_normal((height, width), dtype=np.float32) * sigma
  return np.sqrt((image + n1)**2 + n2 * n2)


# ------------------------------------------------------------------------------------------------------------------
# Official layout (DICOM + annotation JSON)
# ------------------------------------------------------------------------------------------------------------------


def _axial_decoy(rng: np.random.Generator, size: int = 128) -> np.ndarray:
  """A plainly synthetic axial slice `[size, size]` uint16: body outline, vertebral body and canal, mid-grey, noisy."""
  c = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) / np.float32(size / 2.0)
  x, y = c[None, :], c[:, None]
  image = np.where(x * x / 0.85 + y * y / 0.55 < 1.0, 0.35, 0.02).astype(np.float32)
  image = np.where((x / 0.18)**2 + ((y + 0.05) / 0.16)**2 < 1.0, 0.45, image)
  image = np.where((x / 0.08)**2 + ((y - 0.2) / 0.07)**2 < 1.0, 0.8, image)
  image = image + rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.03)
  return np.clip(image * 3000.0, 0.0, 4095.0).astype(np.uint16)


def _annotation_entry(study: PhantomStudy, rng: np.random.Generator) -> dict:
  """The official JSON entry of one study (SPEC §8): points in random order, integer coords, one label key each."""
  points = []
  for i in rng.permutation(objects.NUM_OBJECTS):
    if not study.point_valid[i]:
      continue
    name = objects.NAMES[i]
    points.append({"coord": [int(study.points_xy[i, 0]), int(study.points_xy[i, 1])],
                   "tag": {"identification": name, objects.label_key(name): study.tags[i]},
                   "zIndex": study.z_index})
  return {"studyUid": study.study_uid, "version": "v0.1",
          "data": [{"seriesUid": study.t2_series_uid, "instanceUid": study.instance_uid(),
                    "annotation": [{"annotator": 1, "data": {"point": points}}]}]}


def write_official_layout(root: str | os.PathLike, n_studies: int, seed: int = 0, name: str = "lumbar_phantom",
                          start_index: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes phantom studies `start_index .. start_index + n_studies - 1` in the official Tianchi layout (SPEC §8).

  Writes `root/<name>/study<index>/image<K>.dcm` and `root/<name>_annotation.json`. Each study folder holds, mixed
  flat with shuffled file numbers K:
    - the labelled T2 sagittal series `T2_TSE_SAG` (5..7 slices at the native size; slice k at x = (n-1)/2 * 4.4 mm
      - k * 4.4 mm, so x descending is slice order and the annotated slice's index is the JSON `zIndex`; its
      neighbours are the lateral neighbours, rendered with the same rule as `generate_study`);
    - a dimmer T1 sagittal decoy `T1_TSE_SAG` (3 slices at half resolution, same field of view);
    - an axial T2 decoy `T2_TSE_TRA` (3 plainly synthetic 128x128 slices).
  Pixels are stored as 16-bit (BitsStored 16, MONOCHROME2); each T2 slice spans the full 0..65535 range, so reading
  it back (`dicom.read_study` + `annotations`) gives exactly the record of `generate_study(index, seed)`. The JSON
  has one entry per study (in shuffled order, joined by studyUid), integer coords equal to the record's points.

  Returns:
    (study_dir, annotation_path) = (`root/<name>`, `root/<name>_annotation.json`).
  """
  if n_studies < 1:
    raise ValueError(f"write_official_layout: n_studies must be >= 1, got {n_studies}")
  root = pathlib.Path(root)
  study_dir = root / name
  annotation_path = root / f"{name}_annotation.json"
  entries = []
  for index in range(start_index, start_index + n_studies):
    study = phantom_study(index, seed)
    rng = _rng(seed, index, 3)
    folder = study_dir / f"study{index}"
    n_t2, n_t1, n_ax = study.num_slices, 3, 3
    file_numbers = rng.permutation(n_t2 + n_t1 + n_ax)
    paths = [folder / f"image{k}.dcm" for k in file_numbers]
    series_numbers = rng.permutation([2, 3, 4])
    row_mm, col_mm = study.spacing_mm
    patient = f"PHANTOM-{seed}-{index}"

    def sagittal(n: int, first: int, shape: tuple[int, int], spacing: tuple[float, float]) -> list:
      # Top-left pixel centre such that the image centre lies at y = z = 0.
      y0 = -(shape[1] - 1) / 2.0 * spacing[1]
      z0 = (shape[0] - 1) / 2.0 * spacing[0]
      x = dicom_write.sagittal_positions(study.num_slices, spacing_mm=SLICE_GAP_MM, y_mm=y0, z_mm=z0)
      return x[first:first + n]

    t2_slices = [study.render_slice(k) for k in range(n_t2)]
    dicom_write.write_series(
        paths[:n_t2], t2_slices, study_uid=study.study_uid, series_uid=study.t2_series_uid,
        instance_uids=study.t2_instance_uids, description="T2_TSE_SAG",
        positions=sagittal(n_t2, 0, (study.height, study.width), study.spacing_mm),
        pixel_spacing_mm=study.spacing_mm, series_number=int(series_numbers[0]), patient_id=patient)

    t1_shape = (study.height // 2, study.width // 2)
    t1_spacing = (row_mm * study.height / t1_shape[0], col_mm * study.width / t1_shape[1])
    first = study.z_index - 1
    t1_slices = [study.render_slice(k, "t1", shape=t1_shape) // 32 for k in range(first, first + n_t1)]
    dicom_write.write_series(
        paths[n_t2:n_t2 + n_t1], t1_slices, study_uid=study.study_uid, series_uid=study.t1_series_uid,
        instance_uids=[_uid(seed, index, "instance", "T1_TSE_SAG", k) for k in range(n_t1)],
        description="T1_TSE_SAG", positions=sagittal(n_t1, first, t1_shape, t1_spacing),
        pixel_spacing_mm=t1_spacing, series_number=int(series_numbers[1]), patient_id=patient)

    dicom_write.write_series(
        paths[n_t2 + n_t1:], [_axial_decoy(rng) for _ in range(n_ax)], study_uid=study.study_uid,
        series_uid=study.axial_series_uid,
        instance_uids=[_uid(seed, index, "instance", "T2_TSE_TRA", k) for k in range(n_ax)],
        description="T2_TSE_TRA", orientation=dicom_write.AXIAL_ORIENTATION,
        positions=[(-100.0, -100.0, 30.0 - 30.0 * k) for k in range(n_ax)], pixel_spacing_mm=(1.6, 1.6),
        series_number=int(series_numbers[2]), patient_id=patient)
    entries.append(_annotation_entry(study, rng))

  order = _rng(seed, start_index, 4, n_studies).permutation(len(entries))
  annotation_path.parent.mkdir(parents=True, exist_ok=True)
  with open(annotation_path, "w", encoding="utf-8") as f:
    json.dump([entries[i] for i in order], f)
  return study_dir, annotation_path


def _benchmark(n: int = 50, seed: int = 0) -> None:
  """Prints the time to generate one study (`python -m ccfnet_jax.data.phantom [N]`)."""
  import time  # pylint: disable=g-import-not-at-top
  start, start_cpu = time.perf_counter(), time.process_time()
  pixels = 0
  for index in range(n):
    pixels += generate_study(index, seed)["image"].size // 3
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
  print(f"generate_study: {1e3 * seconds / n:.1f} ms wall, {1e3 * cpu_seconds / n:.1f} ms CPU per study "
        f"({n} studies, mean {pixels / n:.0f} px per slice, 3 slices each)")


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  _benchmark(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
