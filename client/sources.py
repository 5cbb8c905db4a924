"""Frame sources for `promptmad score`: a folder (recursive, sorted), an image-list file, or a video."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from promptmad.client.errors import InvalidInput
from promptmad.contract import IMAGE_SUFFIXES, VIDEO_SUFFIXES


def iter_source(source: str | Path) -> Iterator[tuple[str, object]]:
    """Yields (frame_id, frame): paths for images (sent as encoded bytes), arrays for video frames."""
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidInput(f"{src}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        for p in files:
            yield str(p.relative_to(src)), p
    elif src.is_file() and src.suffix.lower() in VIDEO_SUFFIXES:
        try:
            import imageio.v3 as iio
        except ImportError as exc:
            raise InvalidInput("reading video needs `pip install imageio[ffmpeg]`") from exc
        try:
            for i, frame in enumerate(iio.imiter(src)):
                yield f"{src.name}#{i:06d}", frame[..., :3]
        except Exception as exc:
            raise InvalidInput(f"{src}: cannot decode video ({exc}); `pip install imageio[ffmpeg]` for mp4/avi") from exc
    elif src.is_file():
        base = src.parent
        for line in src.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = (base / line) if not Path(line).is_absolute() else Path(line)
                yield line, p
    else:
        raise InvalidInput(f"{src}: not a folder, image list or video file")
