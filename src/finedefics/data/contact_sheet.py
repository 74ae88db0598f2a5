"""A contact sheet per dataset: a few train images of every class, with the class name."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps


def contact_sheet(train: pd.DataFrame, classes: list[str], per_class: int = 6, thumb: int = 64) -> Image.Image:
    """Tiles of `per_class` thumbnails of train images per class, in up to four columns of tiles."""
    font = ImageFont.load_default()
    label_h = 14
    tile_w, tile_h = per_class * (thumb + 2) + 8, thumb + label_h + 8
    columns = min(4, max(1, math.ceil(len(classes) / 25)))
    rows = math.ceil(len(classes) / columns)
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    train = train.sort_values("image_id")
    for label, name in enumerate(classes):
        x0, y0 = (label // rows) * tile_w + 4, (label % rows) * tile_h + 4
        draw.text((x0, y0), f"{label}: {name}", fill="black", font=font)
        for j, path in enumerate(train.loc[train.label == label, "path"].head(per_class)):
            with Image.open(Path(path)) as im:
                tile = ImageOps.pad(im.convert("RGB"), (thumb, thumb), color="white")
            sheet.paste(tile, (x0 + j * (thumb + 2), y0 + label_h))
    return sheet
