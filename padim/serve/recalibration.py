"""``POST /models/NAME/recalibrate`` (issue 28): new thresholds for a served model from the pictures
operators confirmed good, swapped in live.

1. The pictures: the model's sample of scored pictures (``--keep-good-sample N``: uniform since its
   last drift alarm, ``padim.monitor.good_sample``), those taken at or after ``since`` whose operator
   verdict (``POST /models/NAME/feedback``) is good; with ``include_unconfirmed`` also those nobody
   gave a verdict on. A picture an operator marked defect is never used.
2. The model file of the version serving is read once and checked to be the bytes that version was
   loaded from (else 409: the file changed; the reloader is about to serve it), loaded with torch,
   and recalibrated (``PaDiM.recalibrate``: same Gaussians, so the same scores; new calibration,
   thresholds, p-values, and the file records the pictures, the date and "padim serve").
3. The previous file is kept beside it (``NAME.safetensors.before-recalibration-DATE``, which the
   server does not serve), the new one written atomically in its place, and the reloader loads,
   verifies, warms up and swaps it in as for any changed file: requests in flight finish on the old
   version, none fails; the new version's drift monitor starts on the new calibration scores.

The guarantee afterwards covers pictures exchangeable with the recalibration pictures (see
``padim.core.recalibration``); the answer says how many there were and what they guarantee.
"""

from __future__ import annotations

import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Optional

from padim.errors import PadimError
from padim.files.atomic import atomic_write
from padim.serve.registry import read_content

_LOCK = threading.Lock()  # one recalibration at a time per process


class RecalibrationRefused(PadimError):
    """The recalibration cannot be done as asked (answered 409 with this message)."""


def parse_since(since: Optional[str]) -> Optional[datetime]:
    if since is None:
        return None
    try:
        moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise RecalibrationRefused(f"since must be an ISO 8601 date and time, got {since[:40]!r}") from None
    if moment.tzinfo is None:
        raise RecalibrationRefused("since needs a time zone (e.g. 2026-12-07T08:00:00+00:00)")
    return moment


def confirmed_pictures(monitoring, name: str, since: Optional[str], include_unconfirmed: bool):
    """-> (pictures to recalibrate with, {"sampled", "confirmed_good", "unconfirmed", "defect", "older"})."""
    sample = monitoring.sample(name)
    if sample is None:
        raise RecalibrationRefused("this server keeps no sample of scored pictures: start it with --keep-flagged DIR "
                                   "--keep-good-sample N")
    moment, counter = parse_since(since), monitoring.counter(name)
    counts = {"sampled": 0, "confirmed_good": 0, "unconfirmed": 0, "defect": 0, "older": 0}
    pictures = []
    for image in sample.items():
        meta = sample.metadata(image)
        counts["sampled"] += 1
        if moment is not None and datetime.fromisoformat(str(meta.get("time", "1970-01-01T00:00:00+00:00"))) < moment:
            counts["older"] += 1
            continue
        truth = counter.truth(meta.get("request_id"), meta.get("index"))
        if truth == "defect":
            counts["defect"] += 1
        elif truth == "good":
            counts["confirmed_good"] += 1
            pictures.append(image)
        else:
            counts["unconfirmed"] += 1
            if include_unconfirmed:
                pictures.append(image)
    return pictures, counts


def copies(pictures, folder: Path) -> list:
    """[(copy, original)] of the chosen pictures still there, copied into ``folder`` (their unique
    sample names kept): the sample drops pictures as new ones arrive and empties at a drift alarm,
    while recalibration reads them."""
    kept = []
    for picture in pictures:
        try:
            data = Path(picture).read_bytes()
        except OSError:
            continue  # dropped from the sample since it was chosen
        target = folder / Path(picture).name
        target.write_bytes(data)
        kept.append((target, picture))
    if not kept:
        raise RecalibrationRefused("the chosen pictures left the sample before they could be read: ask again")
    return kept


def recalibrate_served(service, name: str, since: Optional[str] = None, include_unconfirmed: bool = False,
                       target_fpr: Optional[float] = None) -> dict:
    """Recalibrates the version serving ``name`` and swaps the result in -> the answer (see the module)."""
    from padim.core.estimator import PaDiM

    if service.reloader is None:
        raise RecalibrationRefused("this server was not given model files to watch: recalibrate the file with "
                                   "padim recalibrate and restart")
    with _LOCK:
        version = service.current(name)
        path = Path(version.entry.path)
        if path.is_dir() or version.model.engine != "torch":
            raise RecalibrationRefused("only models served from a model file with the torch engine are recalibrated "
                                       "live: recalibrate the model file (padim recalibrate) and export it again")
        pictures, counts = confirmed_pictures(service.monitoring, version.name, since, include_unconfirmed)
        if not pictures:
            raise RecalibrationRefused(
                f"no confirmed good pictures to recalibrate with ({counts['sampled']} sampled since the last drift "
                f"alarm, {counts['confirmed_good']} confirmed good, {counts['defect']} marked defect, "
                f"{counts['older']} before since): give verdicts (POST /models/{version.name}/feedback) on the "
                "sampled pictures' requests, or ask with include_unconfirmed")
        sha256, content, _ = read_content(path)
        if sha256 != version.sha256:
            raise RecalibrationRefused(f"model file {path.name} changed since the version serving was loaded: it is "
                                       "being reloaded; ask again once it serves")
        device = str(getattr(version.model, "device_", "cpu"))  # where the serving version scores
        model = PaDiM.load(content, device=device, batch_size=min(16, service.settings.max_batch), workers=1)
        before = model.image_threshold_
        with tempfile.TemporaryDirectory() as scratch:  # the sample changes while requests arrive: copies
            copied = copies(pictures, Path(scratch))
            model.recalibrate([copy for copy, _ in copied], target_fpr=target_fpr)
        model.calibrated_by_ = "padim serve"
        model.calibration_images_ = [str(original) for _, original in copied]  # where they were sampled
        stamp = datetime.now().astimezone().strftime("%Y%m%dT%H%M%S")
        kept = path.with_name(f"{path.name}.before-recalibration-{stamp}")
        atomic_write(kept, lambda f: f.write(bytes(content.data)), RecalibrationRefused, "previous model file")
        model.save(path)
        summary = service.reloader.reload()
        serving = service.current(version.name)
        if serving.sha256 == version.sha256:
            errors = summary.get("errors", {}).get(version.name, {}).get("error", "not reloaded")
            raise PadimError(f"the recalibrated file was written but not served: {errors}")
    calibration = model.calibration_
    return {"model": version.name, "previous_sha256": version.sha256, "sha256": serving.sha256,
            "kept_previous": kept.name, "pictures": calibration.n, "counts": counts, "since": since,
            "image_threshold": {"before": before, "after": model.image_threshold_},
            "threshold_source": model.threshold_source_, "pixel_threshold": model.pixel_threshold_,
            "guarantee": (f"at most {100 * calibration.guaranteed(model.target_fpr_):.3g} % of good pictures flagged, "
                          f"for pictures exchangeable with these {calibration.n} (same line, lighting, camera)")}
