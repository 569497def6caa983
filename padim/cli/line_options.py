"""The options of running padim on a line (issues 23, 28): the drift alarm's bound (``padim predict``
and ``padim serve``), and ``padim serve``'s webhook, reloads, decision log, kept pictures and sample."""

from __future__ import annotations

from pathlib import Path


def drift_option(parser) -> None:
    parser.add_argument("--drift-delta", type=float, default=0.01, metavar="D",
                        help="drift alarm (models with calibration): the probability that it ever fires while the "
                             "images stay exchangeable with the calibration images, per stream (default: 0.01)")


def line_options(serve) -> None:
    """padim serve on a line for months (issue 23): drift alarms, model versions, the decision log."""
    drift_option(serve)
    serve.add_argument("--webhook", default=None, metavar="URL",
                       help="POST each drift alarm as JSON to URL (in the background, 5 s timeout; a failure is one "
                            "log line)")
    serve.add_argument("--reload-interval", type=float, default=2.0, metavar="S",
                       help="look at the model files every S seconds: new, changed and removed ones are loaded, "
                            "warmed up and swapped in live, or refused (the old version keeps serving); 0: only on "
                            "POST /admin/reload (default: 2)")
    serve.add_argument("--log-decisions", type=Path, default=None, metavar="DIR",
                       help="append every decision to JSON-lines files in DIR (one fsynced write per request; "
                            "rotated at --log-max-mb)")
    serve.add_argument("--log-max-mb", type=float, default=64.0, metavar="MB",
                       help="size of one decision log file (default: 64)")
    serve.add_argument("--keep-flagged", type=Path, default=None, metavar="DIR",
                       help="keep the images labelled anomalous (with their decision as JSON) in DIR for review")
    serve.add_argument("--keep-max-gb", type=float, default=None, metavar="N",
                       help="with --keep-flagged: at most N GB there, the oldest dropped first (default: 1)")
    serve.add_argument("--keep-good-sample", type=int, default=None, metavar="N",
                       help="with --keep-flagged DIR: keep a uniform sample of N of each model's scored pictures since "
                            "its last drift alarm in DIR/good-sample/NAME: the pictures POST /models/NAME/recalibrate "
                            "takes the operators' confirmed good ones from")
