"""Draws docs/images/letterbox.png: a 1536 x 1024 picture, stretched to 384 x 384 (what ingest
and the engine did before) and letterboxed to 384 x 384 (what they do now, as Janus does).

    .venv/bin/python docs/images/make_letterbox_figure.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from janus_lab.data.images import letterbox

SIDE = 384  # Janus-Pro's image side
GAP = 16
CAPTION = 28


def landscape() -> Image.Image:
    """A GPT-4o-sized landscape (1536 x 1024) with round things that show any distortion."""
    image = Image.new("RGB", (1536, 1024), (120, 180, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 700, 1536, 1024), fill=(90, 160, 80))
    draw.ellipse((1150, 120, 1400, 370), fill=(250, 210, 60))  # the sun, a circle
    for x in (250, 650):  # two wheels, circles
        draw.ellipse((x - 150, 550, x + 150, 850), fill=(40, 40, 40))
        draw.ellipse((x - 60, 640, x + 60, 760), fill=(200, 200, 200))
    draw.rectangle((100, 400, 800, 620), fill=(200, 40, 40))  # a cart between them
    return image


def main() -> None:
    original = landscape()
    panels = [
        ("original 1536 x 1024", original.resize((SIDE, SIDE * 1024 // 1536), Image.Resampling.BICUBIC)),
        ("before: stretched to 384 x 384", original.resize((SIDE, SIDE), Image.Resampling.BICUBIC)),
        ("now: letterbox(image, 384)", letterbox(original, SIDE)),
    ]
    sheet = Image.new("RGB", (len(panels) * (SIDE + GAP) + GAP, SIDE + CAPTION + 2 * GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (caption, panel) in enumerate(panels):
        x = GAP + i * (SIDE + GAP)
        sheet.paste(panel, (x, GAP + CAPTION + (SIDE - panel.height) // 2))
        draw.text((x, GAP), caption, fill="black")
    out = Path(__file__).with_name("letterbox.png")
    sheet.save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
