"""Synthetic sagittal T2 lumbar-spine phantoms: the built-in data set that needs no download.

`generate_study(index, seed)` returns one study as a data record (`records.RECORD_FIELDS`):

- `image` uint16 `[H, W, 3]`: 3 adjacent sagittal slices (z-1, z, z+1), each min-max scaled to 0..65535;
  native sizes 256..448 px per side, not always square.
- `pixel_spacing_mm` float32 `[2]` (row, col), 0.58..1.2 mm; `points_xy` float32 `[11, 2]` (x, y) native px in the
  object order of `ccfnet_jax.objects` (vertebra point = body centre, disc point = disc centre, rounded to whole
  pixels exactly as the official annotation stores them); `point_valid` bool `[11]` (about 3 % of the studies lack
  the top disc's point, as one real study does); `disease` int32 `[11]` (1, 0, -1 absent); `tags` `[11]` str in the
  official vocabulary; `study_uid`, `series_uid`, `instance_uid` str.

Anatomy: 5 lumbar bodies (rounded rectangles: cortical rim, marrow with texture), 6 discs (dark annulus, bright
nucleus) from T12-L1 to L5-S1, T12 and T11 above, the sacrum below with a sacral kink, the CSF-filled canal behind the
bodies with the cord / cauda equina, posterior elements, paraspinal muscle, subcutaneous fat and skin, abdomen in front;
lordotic curvature; random scale, position, tilt, field of view and image size; smooth bias field; Rician noise.
Disease changes appearance with a random strength (and ~6 % label noise), so classification is learnable, not trivial:
degenerated discs are darker and lower, bulges (v2) and protrusions / extrusions (v3 / v4) push disc material into the
canal, a Schmorl's node (v5) is a dark notch in an endplate, degenerated vertebrae show endplate signal change (Modic
bands) and anterior osteophyte lips.

Modules: `anatomy` samples a study's parameters (`phantom_study`: no pixels), `raster` renders its slices,
`official_layout` writes studies as DICOM + annotation JSON in the official layout. The same (index, seed) gives the
same bytes on any machine.
"""

from ccfnet_jax.data.phantom.anatomy import (LABEL_NOISE_RATE, MISSING_TOP_DISC_RATE, SLICE_GAP_MM, PhantomStudy,
                                             phantom_study)
from ccfnet_jax.data.phantom.official_layout import write_official_layout
from ccfnet_jax.data.phantom.raster import record, render_slice

__all__ = ["PhantomStudy", "phantom_study", "generate_study", "record", "render_slice", "write_official_layout",
           "SLICE_GAP_MM", "MISSING_TOP_DISC_RATE", "LABEL_NOISE_RATE"]


def generate_study(index: int, seed: int = 0) -> dict:
  """Phantom study `index` of set `seed` as a data record (see the module docstring); deterministic."""
  return record(phantom_study(index, seed))
