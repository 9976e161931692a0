"""The QC picture of a case (PNG, Pillow): axial slices with the muscles outlined, a coronal and a sagittal reformat.

- Axial row(s): the mid-slice of each vertebral level T4..L4 when the levels are known, else six evenly
  spaced slices over the muscles' cranio-caudal extent; superior first; patient right on the image left
  (radiological convention), anterior up. Each tile is cropped to the muscles plus 15 mm (a spill anywhere
  widens it; no muscles: the body) and drawn at its physical aspect.
- Coronal reformat through the muscles' centroid and sagittal reformat through the right erector spinae
  (the left one, else the muscles' centroid), superior up, with the axial positions marked.
- Muscles: filled at 30 % opacity and outlined in the colour table of postprocess/colours.py; the legend
  lists every muscle, and one that the mask does not contain is marked "absent".
CT window: soft tissue, level 40 HU, width 400 HU.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.labels import LABELS
from postprocess.colours import colour_lookup_table
from postprocess.measures import SliceMeasures, level_slices

WINDOW_LEVEL_HU, WINDOW_WIDTH_HU = 40.0, 400.0
FILL_OPACITY = 0.30
TILE_WIDTH_PX = 300
REFORMAT_HEIGHT_PX = 560
TILES_PER_ROW = 7
EVEN_SLICES = 6
_BACKGROUND = (18, 18, 18)
_TEXT = (235, 235, 235)
_DIM = (130, 130, 130)
_GAP = 8


def _font(size: int):
    return ImageFont.load_default(size=size)


def _window(hu: np.ndarray) -> np.ndarray:
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2
    return (np.clip((hu.astype(np.float32) - low) / WINDOW_WIDTH_HU, 0.0, 1.0) * 255).astype(np.uint8)


def _overlay(hu_2d: np.ndarray, labels_2d: np.ndarray, size_wh: tuple[int, int]) -> Image.Image:
    """CT (bilinear) and labels (nearest) resampled to `size_wh`, muscles filled and outlined."""
    grey = np.asarray(Image.fromarray(_window(hu_2d)).resize(size_wh, Image.BILINEAR), dtype=np.float32)
    labels = np.asarray(Image.fromarray(labels_2d.astype(np.uint8)).resize(size_wh, Image.NEAREST))
    colours = colour_lookup_table().astype(np.float32)[labels]
    rgb = np.repeat(grey[..., None], 3, axis=2)
    inside = labels > 0
    rgb[inside] = (1 - FILL_OPACITY) * rgb[inside] + FILL_OPACITY * colours[inside]
    edge = np.zeros_like(inside)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge &= inside
    rgb[edge] = colours[edge]
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _bounding_box(mask_2d: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a 2D mask with a margin, the whole plane when empty."""
    if not mask_2d.any():
        return 0, mask_2d.shape[0], 0, mask_2d.shape[1]
    ys, xs = np.nonzero(mask_2d)
    return (max(int(ys.min()) - margin, 0), min(int(ys.max()) + 1 + margin, mask_2d.shape[0]),
            max(int(xs.min()) - margin, 0), min(int(xs.max()) + 1 + margin, mask_2d.shape[1]))


def axial_positions(measures: SliceMeasures, labels_lps: np.ndarray) -> list[tuple[int, str]]:
    """(LPS slice, caption) of each axial tile, superior first."""
    levels = level_slices(measures)
    if levels:
        return [(mid, level) for level, (_, mid) in levels.items()]  # LEVELS run cranial to caudal
    present = np.flatnonzero(measures.voxels[:, 1:].sum(axis=1) > 0)
    first, last = (int(present[0]), int(present[-1])) if len(present) else (0, labels_lps.shape[0] - 1)
    span = last - first + 1
    picks = sorted({first + int((i + 0.5) * span / EVEN_SLICES) for i in range(EVEN_SLICES)}, reverse=True)
    return [(k, "") for k in picks]


def render_qc(labels_zyx: np.ndarray, hu_zyx: np.ndarray, measures: SliceMeasures, *, title: str, subtitle: str) -> Image.Image:
    """The QC picture as an RGB image (see the module docstring)."""
    frame = measures.frame
    labels = frame.view(labels_zyx)
    hu = frame.view(hu_zyx)
    sx, sy, sz = frame.spacing_mm
    n_slices = labels.shape[0]
    # crop to the muscles (they wrap the trunk; a spill anywhere widens the crop, as it should), else to the body
    muscles_yx = (labels > 0).any(axis=0)
    region = muscles_yx if muscles_yx.any() else (hu > -400).any(axis=0)
    y0, y1, x0, x1 = _bounding_box(region, margin=int(round(15 / sx)))

    # axial tiles
    tile_h = int(round(TILE_WIDTH_PX * ((y1 - y0) * sy) / ((x1 - x0) * sx)))
    positions = axial_positions(measures, labels)
    small, caption_font = _font(13), _font(15)
    tiles = []
    for k, level in positions:
        tile = _overlay(hu[k, y0:y1, x0:x1], labels[k, y0:y1, x0:x1], (TILE_WIDTH_PX, tile_h))
        draw = ImageDraw.Draw(tile)
        caption = f"{level}  " if level else ""
        draw.text((6, 4), f"{caption}slice {int(frame.input_slice[k])}  z {frame.z_mm[k]:.0f} mm", font=caption_font, fill=_TEXT,
                  stroke_width=2, stroke_fill=(0, 0, 0))
        draw.text((6, tile_h - 18), "R", font=small, fill=_TEXT)
        draw.text((TILE_WIDTH_PX - 14, tile_h - 18), "L", font=small, fill=_TEXT)
        centre = measures.body_centre_mm[k]
        if np.isfinite(centre[0]):  # the vertebral body centre the moment arms are measured from
            cx = (centre[0] / sx - x0 + 0.5) * TILE_WIDTH_PX / (x1 - x0)
            cy = (centre[1] / sy - y0 + 0.5) * tile_h / (y1 - y0)
            draw.line([(cx - 6, cy), (cx + 6, cy)], fill=(255, 255, 0), width=2)
            draw.line([(cx, cy - 6), (cx, cy + 6)], fill=(255, 255, 0), width=2)
        tiles.append(tile)

    # reformats: superior up
    # planes from the measures' centroid sums (no pass over the volume)
    total = measures.voxels[:, 1:].sum()
    if total:
        y_plane = int(np.round(measures.y_sum_mm[:, 1:].sum() / total / sy))
        x_plane = int(np.round(measures.x_sum_mm[:, 1:].sum() / total / sx))
    else:
        y_plane, x_plane = labels.shape[1] // 2, labels.shape[2] // 2
    sagittal_label = "through the muscles' centroid"
    for name in ("erector_spinae_right", "erector_spinae_left"):
        count = measures.voxels[:, LABELS[name]].sum()
        if count:
            x_plane = int(np.round(measures.x_sum_mm[:, LABELS[name]].sum() / count / sx))
            sagittal_label = f"through {name.replace('_', ' ')}"
            break
    # one scale for both, at their physical aspect, each within REFORMAT_HEIGHT_PX x REFORMAT_HEIGHT_PX
    height_mm, coronal_mm, sagittal_mm = n_slices * sz, (x1 - x0) * sx, (y1 - y0) * sy
    scale = REFORMAT_HEIGHT_PX / max(height_mm, coronal_mm, sagittal_mm)
    reformat_h = max(int(round(height_mm * scale)), 1)
    coronal = _overlay(hu[::-1, y_plane, x0:x1], labels[::-1, y_plane, x0:x1], (max(int(round(coronal_mm * scale)), 1), reformat_h))
    sagittal = _overlay(hu[::-1, y0:y1, x_plane], labels[::-1, y0:y1, x_plane], (max(int(round(sagittal_mm * scale)), 1), reformat_h))
    for image, name in ((coronal, "coronal"), (sagittal, "sagittal")):
        draw = ImageDraw.Draw(image)
        last_label_row = -100
        for k, level in positions:  # superior first: rows increase
            row = int(round((n_slices - 1 - k + 0.5) * reformat_h / n_slices))
            draw.line([(0, row), (12, row)], fill=(255, 255, 255), width=2)
            draw.line([(image.width - 12, row), (image.width, row)], fill=(255, 255, 255), width=2)
            if row - last_label_row >= 15:  # no overlapping captions on a short scan
                draw.text((15, row - 8), level or str(int(frame.input_slice[k])), font=small, fill=_TEXT, stroke_width=2, stroke_fill=(0, 0, 0))
                last_label_row = row
        draw.text((image.width // 2, 4), name, font=caption_font, fill=_TEXT, stroke_width=2, stroke_fill=(0, 0, 0), anchor="mt")
        if name == "coronal":
            draw.text((6, image.height - 18), "R", font=small, fill=_TEXT)
            draw.text((image.width - 14, image.height - 18), "L", font=small, fill=_TEXT)
        else:
            draw.text((6, image.height - 18), "A", font=small, fill=_TEXT)
            draw.text((image.width - 14, image.height - 18), "P", font=small, fill=_TEXT)

    legend = draw_legend(measures.voxels.sum(axis=0) > 0, sagittal_label=sagittal_label)

    # compose
    columns = min(len(tiles), TILES_PER_ROW)
    tile_rows = -(-len(tiles) // TILES_PER_ROW)
    axial_w = columns * TILE_WIDTH_PX + (columns - 1) * _GAP
    bottom_w = coronal.width + sagittal.width + legend.width + 2 * _GAP
    header_h = 52
    width = max(axial_w, bottom_w) + 2 * _GAP
    height = header_h + tile_rows * (tile_h + _GAP) + max(reformat_h, legend.height) + 2 * _GAP
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((_GAP, 6), title, font=_font(20), fill=_TEXT)
    draw.text((_GAP, 30), subtitle, font=small, fill=_DIM)
    for i, tile in enumerate(tiles):
        row, column = divmod(i, TILES_PER_ROW)
        canvas.paste(tile, (_GAP + column * (TILE_WIDTH_PX + _GAP), header_h + row * (tile_h + _GAP)))
    top = header_h + tile_rows * (tile_h + _GAP) + _GAP
    canvas.paste(coronal, (_GAP, top))
    canvas.paste(sagittal, (_GAP + coronal.width + _GAP, top))
    canvas.paste(legend, (_GAP + coronal.width + sagittal.width + 2 * _GAP, top))
    return canvas


def draw_legend(present: np.ndarray, *, sagittal_label: str) -> Image.Image:
    """The legend: one row per muscle (right, then left swatch); a muscle absent from the mask is crossed out and
    named "absent" (`present[value]`: the label value occurs in the mask)."""
    small = _font(13)
    table = colour_lookup_table()
    muscles = sorted({name.rsplit("_", 1)[0] for name in LABELS}, key=lambda m: LABELS[f"{m}_right"])
    row_h, swatch = 24, 16
    legend_w = 330
    legend = Image.new("RGB", (legend_w, 40 + row_h * len(muscles) + 80), _BACKGROUND)
    draw = ImageDraw.Draw(legend)
    draw.text((8, 6), "right", font=small, fill=_TEXT)
    draw.text((50, 6), "left", font=small, fill=_TEXT)
    draw.text((92, 6), "muscle", font=small, fill=_TEXT)
    for i, muscle in enumerate(muscles):
        top = 30 + i * row_h
        marks = []
        for column, side in enumerate(("right", "left")):
            value = LABELS[f"{muscle}_{side}"]
            left = 10 + column * 42
            draw.rectangle([left, top, left + swatch * 2, top + swatch], fill=tuple(int(c) for c in table[value]), outline=(0, 0, 0))
            if not present[value]:
                draw.line([(left, top), (left + swatch * 2, top + swatch)], fill=(0, 0, 0), width=3)
                marks.append(side)
        text = muscle.replace("_", " ")
        draw.text((92, top), text + (f"  absent: {' & '.join(marks)}" if marks else ""), font=small, fill=_DIM if len(marks) == 2 else _TEXT)
    note_top = 30 + len(muscles) * row_h + 8
    draw.text((8, note_top), f"W{WINDOW_WIDTH_HU:.0f} L{WINDOW_LEVEL_HU:.0f}; fill {FILL_OPACITY:.0%}, outline full", font=small, fill=_DIM)
    draw.text((8, note_top + 18), f"sagittal {sagittal_label}", font=small, fill=_DIM)
    draw.text((8, note_top + 36), "yellow cross: vertebral body centre (moment arms)", font=small, fill=_DIM)
    return legend


def png_bytes(image: Image.Image) -> bytes:
    stream = io.BytesIO()
    image.save(stream, format="PNG", compress_level=6)
    return stream.getvalue()
