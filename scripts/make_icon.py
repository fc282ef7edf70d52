"""Draw the SALTSegment icon (128x128 PNG) for the extension and the module.

Run from the repository root: ``python scripts/make_icon.py``. It writes
``Resources/SALTSegment.png`` and ``SALTSegment/Resources/Icons/SALTSegment.png``
(the same picture): a stack of three image slices, the top one carrying a
segmented structure, above the word SALT.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 128
ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = [ROOT / "Resources" / "SALTSegment.png", ROOT / "SALTSegment" / "Resources" / "Icons" / "SALTSegment.png"]


def _slice(draw: ImageDraw.ImageDraw, dx: int, dy: int, fill: tuple[int, int, int]) -> None:
    # A slice seen in perspective: a parallelogram.
    points = [(22 + dx, 52 + dy), (86 + dx, 52 + dy), (106 + dx, 26 + dy), (42 + dx, 26 + dy)]
    draw.polygon(points, fill=fill, outline=(235, 240, 245))


def draw_icon() -> Image.Image:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((2, 2, SIZE - 3, SIZE - 3), radius=18, fill=(28, 46, 66))
    for offset, shade in ((28, 70), (16, 95), (4, 120)):
        _slice(draw, -4, offset + 6, (shade, shade + 8, shade + 18))
    # The segmented structure on the top slice, with the mask outline.
    draw.ellipse((46, 36, 78, 54), fill=(230, 90, 70), outline=(255, 200, 180), width=2)
    font = ImageFont.load_default(size=30)
    text = "SALT"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((SIZE - (right - left)) / 2 - left, 90 - top), text, font=font, fill=(250, 250, 250))
    return image


def main() -> None:
    icon = draw_icon()
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        icon.save(path, optimize=True)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
