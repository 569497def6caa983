"""Sources -> decoded batches -> an engine's scores, with every file's error kept: the loop every
batch surface runs (``PaDiM.predict``, ``ExportedModel``, ``padim predict``, Ray's actors).

A file that cannot be read becomes a ``Scored`` item with its ``error`` (one line, naming the
file) and the rest of its batch is still scored: the step never ends a run, its caller decides
(``errors="raise"`` or ``"record"``). Torch-free: an engine is anything with ``config_`` and
``score_pixels`` (see ``padim.deploy.engines``).

Shapes: B images per batch, (H, W) the model's input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from padim.errors import one_line
from padim.files.images import load_pixels, pictures_per_batch, prefetched
from padim.pipeline.sources import Source


@dataclass
class Decoded:
    """A source read for the model: (H, W, 3) uint8 pixels and the picture's upright original
    (height, width), or the reason it could not be read."""

    source: Source
    pixels: Optional[np.ndarray] = None
    original_hw: Optional[Tuple[int, int]] = None
    error: Optional[str] = None


@dataclass
class Scored:
    """One source after scoring: ``index`` is its position in the input; ``score`` and ``map``
    ((H, W) float32 at the model's input size) are None when it could not be read (``error``)."""

    index: int
    source: Source
    score: Optional[float] = None
    map: Optional[np.ndarray] = None
    original_hw: Optional[Tuple[int, int]] = None
    error: Optional[str] = None


def decode_source(source: Source, config) -> Decoded:
    """Reads one source (``padim.files.images.load_pixels``); whatever stops one file from being
    read (a corrupt, truncated, huge or missing file, a name the file system refuses) is kept as its
    one-line error, never raised: one file never ends a run of 10,000."""
    try:
        pixels, original = load_pixels(source.item, config)
    except Exception as exc:
        return Decoded(source, error=one_line(exc))
    return Decoded(source, pixels, original)


def score_sources(engine, sources: Sequence[Source], batch_size: int, workers: int = 2, ahead: int = 0,
                  progress: Optional[bool] = False, desc: str = "predict") -> Iterator[List[Scored]]:
    """Yields, batch by batch, a ``Scored`` per source in input order. Files are decoded in
    ``workers`` threads; ``ahead`` batches are decoded while the engine scores (1 on a GPU; 0 on the
    CPU, where decoding beside the engine takes its cores, see ``prefetched``).
    progress: False never, None on a terminal only, True always (tqdm)."""
    sources = list(sources)
    batch_size = pictures_per_batch(batch_size, engine.config_.input_size)
    batches = prefetched(sources, batch_size, lambda source: decode_source(source, engine.config_), workers, ahead)
    if progress is not False:
        from tqdm import tqdm  # optional at run time: the torch-free runtime may lack it

        batches = tqdm(batches, total=-(-len(sources) // batch_size), desc=desc, unit="batch",
                       disable=None if progress is None else False)
    start = 0
    for decoded in batches:
        read = [d for d in decoded if d.error is None]
        scores, maps = engine.score_pixels(np.stack([d.pixels for d in read])) if read else ((), ())
        scored = iter(zip(np.asarray(scores).tolist(), maps))
        batch = []
        for offset, item in enumerate(decoded):
            if item.error is not None:
                batch.append(Scored(start + offset, item.source, error=item.error))
            else:
                score, anomaly_map = next(scored)
                batch.append(Scored(start + offset, item.source, score, np.asarray(anomaly_map), item.original_hw))
        start += len(decoded)
        yield batch
