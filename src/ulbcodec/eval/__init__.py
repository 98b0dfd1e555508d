"""Rate-distortion evaluation of ulbc against classical codecs: the engine of ``ulbc eval``
and of the RD benchmarks (benchmarks/image_rd.py, video_rd.py, generative.py).

One module per concept::

    scoring.py  metric names, labels, availability on this machine, scores of one item
    runner.py   items, the (item x codec) tasks, their resumable results cache, the
                worker pool, round trips through each codec, :func:`runner.run`
    rd.py       curves: averaging, monotone envelopes, rate windows, Bjøntegaard deltas
    report.py   outputs: CSV/JSON points and aggregates, RD plots, crop sheet, summary.md
    image_sweep.py  the RD benchmarks' image sweeps (benchmarks/image_rd.py, generative.py)

It measures, for every image or video it is given, how many bits each codec spends
(the real bytes of the complete file x 8 / original pixels, times frames for a video)
and how close the decoded pixels are to the original under each metric of
``ulbcodec.metrics``; then it averages the points into curves, takes each codec's
monotone envelope, and compares ulbc with each baseline by BD-rate. The RD benchmarks
(benchmarks/image_rd.py, video_rd.py) use the same curve rules from here. This module
holds only the names the others share; it imports none of them.

::

    INPUTS (files, folders) ──► find_items ──► Item(path, kind=image|video, sha256)
                                                    │
                      tasks = items x codecs        ▼           RESULTS_DIR/items/
    ┌───────────────────────── run_task (--jobs workers) ────┐  NAME--CODEC--KEY.json
    │ for each setting (quality | rate level x downscale |   │──► (KEY hashes the file's
    │   level x threshold): encode ─► bytes ─► decode ─►     │     content and every
    │   score(metrics) ─► one row; baselines stop once       │     setting: a rerun skips
    │   bpp > --max-bpp                                      │     finished tasks)
    └────────────────────────────────────────────────────────┘
                                                    │ rows
                 ┌──────────────────────────────────┼──────────────────────────────┐
                 ▼                                  ▼                              ▼
     points.csv / points.json          average_curves ─► envelope ─►     crops_<kind>.png
                                       in_window ─► mean_bd_rate         (original / ulbc /
                                                    │                     best baseline at
                                   aggregate.csv/.json, bd_rates.csv,     matched bpp)
                                   rd_<kind>_<metric>.png, summary.md

A metric or codec that cannot run here (no weights, an ffmpeg built without the
encoder) is reported as unavailable, with the reason, in the JSON outputs, the summary
and on stderr; its CSV cells stay empty. Nothing is approximated in its place.
"""

from __future__ import annotations

ULBC = "ulbc"
IMAGE, VIDEO = "image", "video"
KINDS = (IMAGE, VIDEO)


class EvalError(ValueError):
    """Bad input or settings for the whole evaluation: one line, nothing is run."""
