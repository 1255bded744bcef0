"""The sampled parameters of one phantom study: image geometry, labels, the spine's shape and the look of each tissue.

`phantom_study(index, seed)` draws them (no pixels); `raster` turns them into slices. Every random number comes from
a `numpy.random.Generator` seeded from (seed, index[, stream, slice]) and the draws happen in a fixed order, so the
same (index, seed) gives the same study on any machine.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from pydicom.uid import generate_uid

from ccfnet_jax import objects

SALT = 20220311
"""Fixed salt of every seed sequence (changing it changes every phantom)."""
# Streams of random numbers of one study.
ANATOMY, T2_NOISE, T1_NOISE, DECOYS, ORDER = 0, 1, 2, 3, 4
# Slice gap (mm) between sagittal slices, as in the real release.
SLICE_GAP_MM = 4.4
# Fraction of studies whose top disc (T12-L1) is not annotated.
MISSING_TOP_DISC_RATE = 0.03
# Fraction of labels whose appearance is drawn from the other class (label noise).
LABEL_NOISE_RATE = 0.06

SIZES = (256, 288, 320, 352, 384, 416, 448)


@dataclasses.dataclass(frozen=True)
class Tissues:
  """Signal of each tissue (arbitrary units, ~0..1) in one contrast; the field order is the order of their draws."""
  air: float
  soft: float
  muscle: float
  fat: float
  csf: float
  nerve: float
  marrow: float
  cortex: float
  annulus: float
  nucleus: float
  post: float
  abdomen: float
  vessel: float
  modic: float

  def scaled(self, gain: Tissues) -> Tissues:
    """Each tissue's signal times its per-study gain."""
    return Tissues(**{f.name: getattr(self, f.name) * getattr(gain, f.name) for f in dataclasses.fields(self)})


CONTRASTS: dict[str, Tissues] = {
    "t2": Tissues(air=0.0, soft=0.26, muscle=0.2, fat=0.72, csf=0.92, nerve=0.45, marrow=0.45, cortex=0.06,
                  annulus=0.13, nucleus=0.8, post=0.34, abdomen=0.3, vessel=0.04, modic=0.75),
    "t1": Tissues(air=0.0, soft=0.34, muscle=0.3, fat=0.85, csf=0.1, nerve=0.28, marrow=0.62, cortex=0.05,
                  annulus=0.26, nucleus=0.3, post=0.5, abdomen=0.34, vessel=0.04, modic=0.8),
}
"""The labelled T2 series and the T1 decoy."""

# Segments from the top, heights in mm along the spine (before the per-study scale and jitter).
BODY_HEIGHT_MM = dict(T11=22.0, T12=23.5, L1=25.0, L2=26.0, L3=26.5, L4=26.5, L5=26.0, S1=26.0, S2=20.0, S3=16.0,
                      S4=13.0)
DISC_HEIGHT_MM = {"T11-T12": 5.5, "T12-L1": 6.5, "L1-L2": 8.0, "L2-L3": 9.0, "L3-L4": 9.5, "L4-L5": 10.5,
                  "L5-S1": 10.0, "S1-S2": 1.5, "S2-S3": 1.0, "S3-S4": 0.8}
SEGMENTS = ("T11", "T11-T12", "T12", "T12-L1", "L1", "L1-L2", "L2", "L2-L3", "L3", "L3-L4", "L4", "L4-L5", "L5",
            "L5-S1", "S1", "S1-S2", "S2", "S2-S3", "S3", "S3-S4", "S4")
# Prevalence of disc disease per level (T12-L1..L5-S1) and of vertebral degeneration, at a mean "age".
DISC_PREVALENCE = (0.22, 0.33, 0.45, 0.55, 0.72, 0.7)
VERTEBRA_PREVALENCE = 0.8


def _logit(p: float) -> float:
  return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


def study_rng(seed: int, index: int, stream: int, k: int = 0) -> np.random.Generator:
  """A generator for one (seed, index) study and one stream (ANATOMY, T2_NOISE, T1_NOISE, DECOYS, ORDER)."""
  return np.random.default_rng([SALT, seed, index, stream, k])


def study_uid(seed: int, index: int, *parts: object) -> str:
  """A deterministic DICOM UID (pydicom's root; SHA-512 of the entropy sources), unique per (seed, index, parts)."""
  return generate_uid(entropy_srcs=["ccfnet-jax lumbar phantom", str(seed), str(index), *map(str, parts)])


@dataclasses.dataclass
class Segment:
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
class Spine:
  """The spine's shape and place.

  Attributes:
    segments: every body and disc of `SEGMENTS`, top to bottom.
    cx, cy: native pixel position of the L3 centre (the origin of the image frame in mm).
    cos_t, sin_t: the global tilt (image frame = spine frame rotated).
    q_grid, p_grid, slope: the centre line in the spine frame (q caudal, p posterior, mm) and dp/dq.
    depth: body depth (mm, before tapering); scale: the study's size factor.
    q_s2, q_l1: q of the S2 and L1 centres (where the canal ends, where the cord ends).
  """
  segments: list[Segment]
  cx: float
  cy: float
  cos_t: float
  sin_t: float
  q_grid: np.ndarray
  p_grid: np.ndarray
  slope: np.ndarray
  depth: float
  scale: float
  q_s2: float
  q_l1: float


@dataclasses.dataclass
class Torso:
  """Everything around the spine and the imaging: canal, back, fat, abdomen, tissue gains, noise, bias field.

  Attributes:
    canal_mm, canal_gap_mm: canal width and its gap behind the bodies; back_mm, fat_mm, front_mm: distances of the
      skin of the back, the subcutaneous fat and the front of the abdomen from the spine's centre line (mm).
    aorta: whether the aorta's flow void shows.
    tissue_gain: per-tissue gain of the study.
    noise_sigma: Rician noise level; bias: `[5]` coefficients of the quadratic bias field.
    texture_seed: the seed of the smooth textures.
  """
  canal_mm: float
  canal_gap_mm: float
  back_mm: float
  fat_mm: float
  front_mm: float
  aorta: bool
  tissue_gain: Tissues
  noise_sigma: float
  bias: np.ndarray
  texture_seed: int


@dataclasses.dataclass
class DiseaseLooks:
  """How each object's disease shows (arrays `[11]` in object order unless stated).

  Attributes:
    looks_diseased: the label after label noise; strength: 0..1 how strongly it shows; tags: the labels.
    herniation_lateral_mm, bulge_mm, protrusion_mm, extrusion_mm, migration_mm: disc displacement geometry.
    schmorl_side (below), schmorl_u, schmorl_size: Schmorl's node placement.
    modic_bright, modic_where (0 upper, 1 lower, 2 both endplates): endplate signal change.
    osteophyte: `[11, 2]` sizes of the upper and lower anterior lips; cleft: a nuclear cleft in a normal disc.
  """
  looks_diseased: np.ndarray
  strength: np.ndarray
  tags: list[str]
  herniation_lateral_mm: np.ndarray
  bulge_mm: np.ndarray
  protrusion_mm: np.ndarray
  extrusion_mm: np.ndarray
  migration_mm: np.ndarray
  schmorl_side: np.ndarray
  schmorl_u: np.ndarray
  schmorl_size: np.ndarray
  modic_bright: np.ndarray
  modic_where: np.ndarray
  osteophyte: np.ndarray
  cleft: np.ndarray


@dataclasses.dataclass
class PhantomStudy:
  """Everything that defines one phantom study; `raster.render_slice` and `raster.record` derive the pixels.

  Attributes:
    index, seed: the identity of the study.
    height, width: native image size (px).
    spacing_mm: (row, col) pixel spacing.
    num_slices: slices in the T2 sagittal series; `z_index` the annotated one (0-based, x-descending order).
    lateral_mm: lateral offset of the annotated slice from the mid-sagittal plane.
    points_xy: `[11, 2]` float (x, y) px, whole numbers; `point_valid` `[11]`; `disease` `[11]`; `tags` `[11]`.
    study_uid, t2_series_uid, t1_series_uid, axial_series_uid, t2_instance_uids: deterministic UIDs.
    spine, torso, looks: the drawing parameters.
    cache: the rendered slice backgrounds (they do not depend on the lateral position).
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
  spine: Spine = dataclasses.field(repr=False)
  torso: Torso = dataclasses.field(repr=False)
  looks: DiseaseLooks = dataclasses.field(repr=False)
  cache: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)

  def instance_uid(self) -> str:
    return self.t2_instance_uids[self.z_index]


def sample_labels(rng: np.random.Generator) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
  """Disease labels, tags, appearance (the label after label noise) and appearance strength per object."""
  age = rng.standard_normal()
  disease = np.zeros(objects.NUM_OBJECTS, np.int32)
  tags = [""] * objects.NUM_OBJECTS
  looks_diseased = np.zeros(objects.NUM_OBJECTS, bool)
  strength = np.zeros(objects.NUM_OBJECTS, np.float64)
  for level, i in enumerate(objects.DISC_INDICES):
    p = _sigmoid(_logit(DISC_PREVALENCE[level]) + 0.9 * age)
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
    p = _sigmoid(_logit(VERTEBRA_PREVALENCE) + 0.9 * age + 0.5 * (sick_discs - 1))
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
  rng = study_rng(seed, index, ANATOMY)

  # Image size and pixel spacing.
  height = int(rng.choice(SIZES))
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
  disease, tags, looks_diseased, strength = sample_labels(rng)
  point_valid = np.ones(objects.NUM_OBJECTS, bool)
  if rng.random() < MISSING_TOP_DISC_RATE:
    top = objects.INDEX["T12-L1"]
    point_valid[top] = False
    disease[top] = objects.UNKNOWN
    tags[top] = ""

  # Segment heights along the spine (mm).
  scale = rng.uniform(0.86, 1.12)
  heights = {}
  for name in SEGMENTS:
    if name in BODY_HEIGHT_MM:
      h = BODY_HEIGHT_MM[name] * scale * rng.uniform(0.95, 1.05)
      i = objects.INDEX.get(name)
      if i is not None and looks_diseased[i]:
        h *= 1.0 - 0.07 * strength[i]
    else:
      h = DISC_HEIGHT_MM[name] * scale * rng.uniform(0.88, 1.12)
      i = objects.INDEX.get(objects.canonical_name(name) or "")
      if i is not None:
        h *= 1.0 - (0.45 if looks_diseased[i] else 0.15) * strength[i]
    heights[name] = h
  # Arc length of each segment centre, 0 at the centre of L3.
  ends = np.cumsum([heights[n] for n in SEGMENTS])
  centres_s = ends - 0.5 * np.array([heights[n] for n in SEGMENTS])
  centres_s -= centres_s[SEGMENTS.index("L3")]
  s_of = dict(zip(SEGMENTS, centres_s))

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
  for name in SEGMENTS:
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
    segments.append(Segment(name, is_disc, centre, u_axis, v_axis, half_depth, 0.5 * heights[name]))

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

  # The order of these draws is part of every phantom: keep it.
  canal_mm = scale * rng.uniform(11.0, 16.0)
  canal_gap_mm = rng.uniform(1.0, 2.5)
  back_mm = scale * rng.uniform(75.0, 110.0)
  fat_mm = rng.uniform(8.0, 30.0)
  front_mm = scale * rng.uniform(95.0, 190.0)
  aorta = rng.random() < 0.7
  tissue_gain = Tissues(**{f.name: rng.uniform(0.85, 1.15) for f in dataclasses.fields(Tissues)})
  noise_sigma = rng.uniform(0.012, 0.04)
  bias = rng.uniform(-0.25, 0.25, size=5)
  looks = DiseaseLooks(
      looks_diseased=looks_diseased, strength=strength, tags=list(tags),
      herniation_lateral_mm=rng.uniform(-5.0, 5.0, size=objects.NUM_OBJECTS),
      bulge_mm=rng.uniform(1.5, 3.5, size=objects.NUM_OBJECTS), protrusion_mm=rng.uniform(3.0, 6.5, size=11),
      extrusion_mm=rng.uniform(5.0, 9.0, size=11), migration_mm=rng.uniform(-6.0, 6.0, size=11),
      schmorl_side=rng.random(size=11) < 0.5, schmorl_u=rng.uniform(-0.35, 0.35, size=11),
      schmorl_size=rng.uniform(0.7, 1.3, size=11), modic_bright=rng.random(size=11) < 0.65,
      modic_where=rng.integers(0, 3, size=11), osteophyte=rng.uniform(0.5, 1.0, size=(11, 2)),
      cleft=rng.random(size=11) < 0.5)
  torso = Torso(canal_mm=canal_mm, canal_gap_mm=canal_gap_mm, back_mm=back_mm, fat_mm=fat_mm, front_mm=front_mm,
                aorta=aorta, tissue_gain=tissue_gain, noise_sigma=noise_sigma, bias=bias,
                texture_seed=int(rng.integers(0, 2**31)))
  spine = Spine(segments=segments, cx=cx, cy=cy, cos_t=cos_t, sin_t=sin_t, q_grid=q_grid, p_grid=p_grid,
                slope=slope, depth=depth, scale=scale, q_s2=float(np.interp(s_of["S2"], s_grid, q_grid)),
                q_l1=float(np.interp(s_of["L1"], s_grid, q_grid)))
  return PhantomStudy(
      index=index, seed=seed, height=height, width=width, spacing_mm=(row_spacing, col_spacing),
      num_slices=num_slices, z_index=z_index, lateral_mm=rng.uniform(-1.5, 1.5), points_xy=points_xy,
      point_valid=point_valid, disease=disease, tags=list(tags), study_uid=study_uid(seed, index, "study"),
      t2_series_uid=study_uid(seed, index, "series", "T2_TSE_SAG"),
      t1_series_uid=study_uid(seed, index, "series", "T1_TSE_SAG"),
      axial_series_uid=study_uid(seed, index, "series", "T2_TSE_TRA"),
      t2_instance_uids=[study_uid(seed, index, "instance", "T2_TSE_SAG", k) for k in range(num_slices)],
      spine=spine, torso=torso, looks=looks)
