"""Frame sources for `promptmad score`: a folder (recursive, sorted), an image-list file, or a video,
all read lazily (a video is decoded one frame at a time)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from promptmad.client.errors import InvalidInput
from promptmad.contract import IMAGE_SUFFIXES, VIDEO_SUFFIXES


def image_files(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def source_length(source: str | Path) -> int | None:
    """How many frames `iter_source` will yield, when that is cheap to know (None for a video whose
    header does not say): the progress bar's total, without reading the frames."""
    src = Path(source)
    if src.is_dir():
        return len(image_files(src))
    if src.is_file() and src.suffix.lower() in VIDEO_SUFFIXES:
        from promptmad.client.live.decode import video_frame_count

        return video_frame_count(src)
    if src.is_file():
        return sum(1 for line in src.read_text().splitlines() if line.strip() and not line.strip().startswith("#"))
    return None


def iter_source(source: str | Path) -> Iterator[tuple[str, object]]:
    """Yields (frame_id, frame): paths for images (sent as encoded bytes), arrays for video frames."""
    src = Path(source)
    if src.is_dir():
        files = image_files(src)
        if not files:
            raise InvalidInput(f"{src}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        for p in files:
            yield str(p.relative_to(src)), p
    elif src.is_file() and src.suffix.lower() in VIDEO_SUFFIXES:
        from promptmad.client.live.decode import iter_video_file

        for i, frame in enumerate(iter_video_file(src)):  # decoded lazily: one frame at a time in memory
            yield f"{src.name}#{i:06d}", frame
    elif src.is_file():
        base = src.parent
        for line in src.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = (base / line) if not Path(line).is_absolute() else Path(line)
                yield line, p
    else:
        raise InvalidInput(f"{src}: not a folder, image list or video file")
