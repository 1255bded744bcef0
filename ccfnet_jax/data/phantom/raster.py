"""Renders the slices of a phantom study from its parameters (`anatomy.PhantomStudy`).

A slice is painted on a float32 canvas in mm coordinates: torso, abdomen, muscle and fat, the canal and cord, then the
discs and bodies with the features their disease shows, a smooth bias field and Rician noise. The array maths use
only +, -, *, /, sqrt, min/max and comparisons (no transcendental ufuncs, whose SIMD versions may differ between
CPUs), so the same study gives the same bytes on any machine.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ccfnet_jax import objects
from ccfnet_jax.data import dicom
from ccfnet_jax.data.phantom.anatomy import (CONTRASTS, SALT, SEGMENTS, SLICE_GAP_MM, T1_NOISE, T2_NOISE,
                                             PhantomStudy, Tissues, study_rng)


def render_slice(study: PhantomStudy, k: int, contrast: str = "t2", shape: tuple[int, int] | None = None
                 ) -> np.ndarray:
  """Slice `k` (0..num_slices-1, x-descending order) as uint16 `[H, W]` scaled to the full range 0..65535.

  `contrast` 't2' (the labelled series) or 't1' (a decoy); `shape` renders on a coarser grid of the same field of
  view (decoys), default the native size.
  """
  if contrast not in CONTRASTS:
    raise ValueError(f"render_slice: contrast must be 't2' or 't1', got {contrast!r}")
  if not 0 <= k < study.num_slices:
    raise ValueError(f"render_slice: slice {k} outside the series of {study.num_slices} slices")
  image = _render(study, lateral_mm=study.lateral_mm + (k - study.z_index) * SLICE_GAP_MM,
                  noise_rng=study_rng(study.seed, study.index, T2_NOISE if contrast == "t2" else T1_NOISE, k),
                  contrast=contrast, shape=shape)
  return _to_uint16(image)


def record(study: PhantomStudy) -> dict:
  """The data record of a study (`records.RECORD_FIELDS`): slices z-1, z, z+1 of the T2 series and its labels."""
  z = study.z_index
  image = np.stack([render_slice(study, k) for k in (z - 1, z, z + 1)], axis=-1)
  return {
      "image": image,
      "pixel_spacing_mm": np.asarray(study.spacing_mm, np.float32),
      "points_xy": study.points_xy.astype(np.float32),
      "point_valid": study.point_valid.copy(),
      "disease": study.disease.astype(np.int32),
      "tags": np.asarray(study.tags, np.str_),
      "study_uid": study.study_uid,
      "series_uid": study.t2_series_uid,
      "instance_uid": study.instance_uid(),
  }


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


@dataclasses.dataclass
class _Background:
  """The parts of a slice that do not depend on its lateral position, and the spine-frame coordinates of its pixels."""
  image: np.ndarray
  canvas: _Canvas
  u: np.ndarray
  q: np.ndarray
  tex_fine: np.ndarray
  tex_coarse: np.ndarray
  bias: np.ndarray
  signal: Tissues
  canal_front: np.ndarray


def _background(study: PhantomStudy, contrast: str, shape: tuple[int, int]) -> _Background:
  """The background of a slice of `contrast` on a grid of `shape` (cached per study, contrast and grid)."""
  key = (contrast, shape)
  if key in study.cache:
    return study.cache[key]
  spine, torso = study.spine, study.torso
  height, width = shape
  row_mm = study.spacing_mm[0] * study.height / height
  col_mm = study.spacing_mm[1] * study.width / width
  # Pixel centres of a coarser grid cover the same field of view.
  cx = (spine.cx + 0.5) * width / study.width - 0.5
  cy = (spine.cy + 0.5) * height / study.height - 0.5
  cv = _Canvas(height, width, row_mm, col_mm, cx, cy)
  signal = CONTRASTS[contrast].scaled(torso.tissue_gain)
  tex_rng = np.random.default_rng([SALT, torso.texture_seed, height, width])
  tex_coarse = _smooth_field(tex_rng, height, width, 6)
  tex_fine = _smooth_field(tex_rng, height, width, 20)
  tex_mid = _smooth_field(tex_rng, height, width, 12)

  # Spine-frame coordinates of every pixel: q along the spine, u posterior distance from the body centre line.
  X, Y = cv.x_mm[None, :], cv.y_mm[:, None]
  cos_t, sin_t = np.float32(spine.cos_t), np.float32(spine.sin_t)
  p = X * cos_t - Y * sin_t
  q = X * sin_t + Y * cos_t
  q_flat = q.ravel()
  p_c = np.interp(q_flat, spine.q_grid, spine.p_grid).astype(np.float32).reshape(q.shape)
  m = np.interp(q_flat, spine.q_grid, spine.slope).astype(np.float32).reshape(q.shape)
  u = (p - p_c) / np.sqrt(1.0 + m * m)
  # The skin and the front of the abdomen follow the spine's curve only in part.
  u_far = p - np.float32(0.35) * p_c
  edge = cv.edge_mm

  def band(lo, hi, coord=u):
    """Coverage of lo <= coord <= hi (arrays or scalars, mm) with soft edges."""
    return np.clip(np.minimum(coord - lo, hi - coord) / edge + 0.5, 0.0, 1.0)

  full = (slice(None), slice(None))
  half_depth = np.float32(0.5 * spine.depth)
  # Torso: soft tissue between the front of the abdomen and the skin of the back.
  back = np.float32(torso.back_mm) + np.float32(6.0) * tex_coarse
  cv.paint(full, band(-np.float32(torso.front_mm), back, u_far), signal.soft * (1.0 + 0.15 * tex_fine))
  # Abdomen in front of the spine: bowel loops (brighter fluid, darker gas) from smooth texture.
  front = np.minimum(band(-np.float32(torso.front_mm) + 4.0, np.float32(1e3), u_far), band(-1e3, -half_depth - 22.0))
  bowel = np.clip(0.6 + 0.45 * tex_mid + 0.25 * tex_coarse, 0.1, 1.2)
  cv.paint(full, front, signal.abdomen * bowel)
  # Aorta (flow void) in front of the upper lumbar spine.
  if torso.aorta:
    above_l4 = np.clip((np.float32(spine.q_l1 + 75.0) - q) / 8.0, 0.0, 1.0)
    cv.paint(full, band(-half_depth - 22.0, -half_depth - 5.0) * above_l4, signal.vessel)
  # Subcutaneous fat, then paraspinal muscle, then the posterior elements (fading below the sacrum).
  canal_front = half_depth + np.float32(torso.canal_gap_mm)
  canal_back = canal_front + np.float32(torso.canal_mm)
  cv.paint(full, band(back - np.float32(torso.fat_mm), back, u_far), signal.fat * (1.0 + 0.1 * tex_fine))
  muscle = np.minimum(band(canal_back + 14.0, np.float32(1e3)),
                      band(-1e3, back - np.float32(torso.fat_mm) - 1.5, u_far))
  cv.paint(full, muscle, signal.muscle * (1.0 + 0.25 * tex_fine))
  post = band(canal_back - 3.0, canal_back + 14.0) * np.clip((np.float32(spine.q_s2 + 40.0) - q) / 20.0, 0.0, 1.0)
  cv.paint(full, post, signal.post * (0.8 + 0.4 * np.clip(tex_mid, -1.0, 1.0)))
  # Laminae and spinous processes: one per vertebra, behind the canal and a little below the body's centre.
  for seg in spine.segments:
    if seg.is_disc or seg.name.startswith("S"):
      continue
    centre = seg.centre + seg.u_axis * float(canal_back + 13.0) + seg.v_axis * (0.3 * seg.half_height)
    win = cv.window(centre, 26.0)
    if win is None:
      continue
    du, dv = cv.local(win, centre, seg.u_axis, seg.v_axis)
    outline = _rounded_rect_sdf(du, dv, 12.0, 0.42 * seg.half_height + 1.5, 3.0)
    cv.paint(win, cv.soft(outline), signal.cortex)
    cv.paint(win, cv.soft(outline + np.float32(1.3)), signal.post * 1.25 * (1.0 + 0.1 * tex_fine[win]))

  # Smooth multiplicative bias field (stronger towards the receive coil behind the back).
  bx = (cv.x_mm / np.float32(150.0))[None, :]
  by = (cv.y_mm / np.float32(150.0))[:, None]
  c = torso.bias.astype(np.float32)
  bias = 1.0 + c[0] * bx + c[1] * by + c[2] * bx * bx + c[3] * bx * by + c[4] * by * by + np.float32(0.001) * u
  study.cache[key] = _Background(image=cv.image, canvas=cv, u=u, q=q, tex_fine=tex_fine, tex_coarse=tex_coarse,
                                 bias=np.clip(bias, 0.4, 1.6), signal=signal, canal_front=canal_front)
  return study.cache[key]


def _render(study: PhantomStudy, *, lateral_mm: float, noise_rng: np.random.Generator, contrast: str,
            shape: tuple[int, int] | None = None) -> np.ndarray:
  """One sagittal slice at `lateral_mm` from the mid-plane: float32 `[H, W]` (before scaling)."""
  spine, torso, appearance = study.spine, study.torso, study.looks
  height, width = shape or (study.height, study.width)
  bg = _background(study, contrast, (height, width))
  cv = bg.canvas
  cv.image = bg.image.copy()
  signal, u, q, tex_fine, tex_coarse = bg.signal, bg.u, bg.q, bg.tex_fine, bg.tex_coarse
  t2 = contrast == "t2"
  lat = abs(lateral_mm)
  full = (slice(None), slice(None))

  def band(lo, hi):
    return np.clip(np.minimum(u - lo, hi - u) / cv.edge_mm + 0.5, 0.0, 1.0)

  # Canal: CSF between the posterior longitudinal ligament and the posterior elements, narrower off the mid-plane;
  # it ends in the sacrum.
  canal_front = bg.canal_front
  canal_mm = np.float32(torso.canal_mm * math.sqrt(max(0.0, 1.0 - (lat / 13.0)**2)))
  canal_end = np.clip((np.float32(spine.q_s2) - q) / 6.0, 0.0, 1.0)
  canal_bright = float(np.clip(1.0 - (lat / 14.0)**2, 0.25, 1.0))
  if canal_mm > 0.5:
    cv.paint(full, band(canal_front, canal_front + canal_mm) * canal_end, signal.csf * canal_bright)
  # Cord above the conus (about L1), then the cauda equina lying in the back of the sac.
  if lat < 7.0 and canal_mm > 4.0:
    conus = np.clip((np.float32(spine.q_l1 + 8.0) - q) / 6.0, 0.0, 1.0)
    mid = canal_front + 0.5 * canal_mm
    cord = band(mid - 3.5, mid + 3.5) * conus
    roots = band(mid + 0.1 * canal_mm, mid + 0.3 * canal_mm) * (1.0 - conus) * canal_end * np.float32(0.6)
    cv.paint(full, np.maximum(cord, roots) * np.float32(1.0 - lat / 7.0), signal.nerve)

  segments = spine.segments
  looks, strength, tags = appearance.looks_diseased, appearance.strength, appearance.tags
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
    cv.paint(win, cv.soft(_rounded_rect_sdf(du, dv, hd, hh, 5.0)), signal.annulus)
    if seg.name.startswith("S") and seg.name != "S1":
      continue
    sick, a = (bool(looks[i]), float(strength[i])) if i is not None else (False, 0.0)
    darken = (1.0 - 0.7 * a) if sick else (1.0 - 0.3 * a)
    shrink = (1.0 - 0.35 * a) if sick else 1.0
    nucleus = cv.soft(_ellipse_sdf(du - np.float32(0.12 * hd), dv, 0.62 * hd * shrink,
                                   max(0.8, 0.33 * seg.half_height * 2.0 * shrink)))
    value = signal.nucleus * darken if t2 else signal.nucleus
    cv.paint(win, nucleus, value)
    if i is not None and appearance.cleft[i] and not sick and seg.half_height > 3.0:
      cv.paint(win, cv.soft(_rounded_rect_sdf(du, dv, 0.45 * hd, 0.35, 0.3)) * np.float32(0.5), signal.annulus)
    if i is None or not sick:
      continue
    # Disc displacement into the canal, strongest near its lateral position.
    tag = tags[i]
    lateral_gain = max(0.0, 1.0 - ((lateral_mm - appearance.herniation_lateral_mm[i]) / 9.0)**2)
    back_edge = np.float32(hd)
    if "v2" in tag:
      b = appearance.bulge_mm[i] * (0.5 + 0.5 * a)
      cv.paint(win, cv.soft(_ellipse_sdf(du - back_edge + np.float32(1.0), dv, 1.0 + b, seg.half_height + 1.5)),
               signal.annulus * 1.3)
    if "v3" in tag or "v4" in tag:
      extrusion = "v4" in tag
      b = (appearance.extrusion_mm[i] if extrusion else appearance.protrusion_mm[i]) * (0.5 + 0.5 * a) * lateral_gain
      if b > 0.5:
        shift = np.float32(appearance.migration_mm[i] if extrusion else 0.0)
        hh_p = max(1.5, 0.45 * seg.half_height * 2.0 * (1.4 if extrusion else 1.0))
        blob = cv.soft(_ellipse_sdf(du - back_edge, dv - shift, 1.0 + b, hh_p))
        cv.paint(win, blob, signal.annulus)
        inner = cv.soft(_ellipse_sdf(du - back_edge - np.float32(0.5), dv - shift, max(0.5, b - 0.5),
                                     max(0.8, hh_p - 1.2)))
        cv.paint(win, inner, signal.nucleus * (0.55 if t2 else 1.0))

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
    cv.paint(win, cv.soft(outer), signal.cortex)
    marrow = signal.marrow * (1.0 + 0.12 * tex_fine[win] + 0.06 * tex_coarse[win])
    sick, a = (bool(looks[i]), float(strength[i])) if i is not None else (False, 0.0)
    if sick:
      marrow = marrow * (1.0 + 0.25 * a * np.clip(tex_fine[win] * 2.0, -1.0, 1.0))
    cv.paint(win, cv.soft(outer + np.float32(1.4)), marrow)
    if i is None or a <= 0.0:
      continue
    # Endplate signal change (Modic) at the upper / lower / both endplates.
    band_mm = (1.5 + 4.5 * a) if sick else 1.5 * a
    where = appearance.modic_where[i]
    target = signal.modic if appearance.modic_bright[i] else signal.cortex * 2.0
    for sign, use in ((-1.0, where in (0, 2)), (1.0, where in (1, 2))):
      if not use:
        continue
      centre_v = np.float32(sign * (hh - 1.4 - 0.5 * band_mm))
      plate = cv.soft(_rounded_rect_sdf(du, dv - centre_v, hd - 2.0, 0.5 * band_mm, 0.8))
      cv.paint(win, plate * np.float32(min(1.0, 0.35 + 0.6 * a)), target)
    # Anterior osteophyte lips at the upper and lower front corners.
    if sick:
      for j, sign in enumerate((-1.0, 1.0)):
        size = (1.0 + 4.0 * a) * appearance.osteophyte[i, j]
        lip_u, lip_v = -hd + 0.25 * size, sign * (hh + 0.15 * size)
        lip = _ellipse_sdf(du - np.float32(lip_u), dv - np.float32(lip_v), 0.55 * size + 0.5, 0.8 * size + 0.5)
        cv.paint(win, cv.soft(lip), signal.cortex)
        cv.paint(win, cv.soft(lip + np.float32(1.0)), signal.marrow * 0.9)

  # Schmorl's nodes: a dark notch in the endplate above or below the disc (tags with v5).
  for i in objects.DISC_INDICES:
    if "v5" not in tags[i] or not looks[i]:
      continue
    below = bool(appearance.schmorl_side[i])
    where = SEGMENTS.index(objects.NAMES[i]) + (1 if below else -1)
    body = segments[where]  # the body below or above the disc
    sign = -1.0 if below else 1.0  # its endplate that faces the disc
    win = cv.window(body.centre, body.half_depth + body.half_height + 4.0)
    if win is None:
      continue
    du, dv = cv.local(win, body.centre, body.u_axis, body.v_axis)
    size = appearance.schmorl_size[i] * (0.6 + 0.6 * strength[i])
    nu = np.float32(appearance.schmorl_u[i] * body.half_depth)
    nv = np.float32(sign * body.half_height)
    notch = _ellipse_sdf(du - nu, dv - nv, 3.2 * size, 3.4 * size)
    cv.paint(win, cv.soft(notch), signal.cortex)
    cv.paint(win, cv.soft(notch + np.float32(1.0)), signal.annulus * 1.5)

  # Bias field, then Rician noise.
  image = cv.image * bg.bias
  sigma = np.float32(torso.noise_sigma)
  n1 = noise_rng.standard_normal((height, width), dtype=np.float32) * sigma
  n2 = noise_rng.standard_normal((height, width), dtype=np.float32) * sigma
  return np.sqrt((image + n1)**2 + n2 * n2)
