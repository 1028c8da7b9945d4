"""What `vlmx bench --profile` and `--timeline` write: a torch.profiler summary and Chrome trace
of the timed run, and one line per engine step."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def profiler(profile_dir: str | None) -> Iterator[torch.profiler.profile | None]:
    if profile_dir is None:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield prof


_WINDOW_US = 500_000


def write_profile(prof: torch.profiler.profile, profile_dir: str, wall_s: float) -> float:
    """Write `summary.txt` (GPU busy time, top kernels, top host functions) and `trace.json`
    into `profile_dir`; return the fraction of the wall time some kernel ran on the GPU."""
    os.makedirs(profile_dir, exist_ok=True)
    intervals = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy_us, reach = 0.0, float("-inf")
    windows: dict[int, float] = {}  # busy microseconds in each 0.5 s after the first kernel
    for start, end in intervals:  # union of kernel intervals
        if end > reach:
            busy_us += end - max(start, reach)
            at = max(start, reach)
            while at < end:
                w = int((at - intervals[0][0]) // _WINDOW_US)
                edge = min(end, intervals[0][0] + (w + 1) * _WINDOW_US)
                windows[w] = windows.get(w, 0.0) + edge - at
                at = edge
            reach = end
    busy = busy_us / 1e6 / wall_s
    num_windows = max(windows) + 1 if windows else 0
    per_window = [round(100 * windows.get(w, 0.0) / _WINDOW_US) for w in range(num_windows)]
    averages = prof.key_averages()
    with open(os.path.join(profile_dir, "summary.txt"), "w") as f:
        f.write(f"wall {wall_s:.2f} s, GPU busy {busy_us / 1e6:.2f} s ({busy:.1%})\n")
        f.write(f"GPU busy % per 0.5 s: {' '.join(map(str, per_window))}\n\n")
        f.write(
            averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
        )
        f.write("\n")
        f.write(
            averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
        )
    prof.export_chrome_trace(os.path.join(profile_dir, "trace.json"))
    return round(busy, 3)


def write_timeline(steps: list, start: float, path: str) -> dict:
    """Write one line per launched step (seconds since the run began, the step's period until
    the next launch, the launch's host time, tokens, requests, images to encode) to `path`;
    return per kind of step (`decode`: one token per request, `prefill`: the rest) its count,
    time and tokens. With async scheduling a step's period is its share of the wall time; the
    first line's time is how long the first prompts took to reach the engine."""
    launches = [s.launched_at for s in steps[1:]] + [time.perf_counter()]
    kinds: dict[str, dict] = {}
    with open(path, "w") as f:
        f.write("t_s\tperiod_ms\tlaunch_ms\ttokens\trequests\timages\n")
        for step, end in zip(steps, launches):
            period = end - step.launched_at
            f.write(
                f"{step.launched_at - start:.4f}\t{period * 1e3:.2f}\t{step.launch_s * 1e3:.2f}\t"
                f"{step.num_tokens}\t{step.num_requests}\t{step.num_images}\n"
            )
            kind = kinds.setdefault(
                "decode" if step.num_tokens == step.num_requests else "prefill",
                {"steps": 0, "seconds": 0.0, "tokens": 0},
            )
            kind["steps"] += 1
            kind["seconds"] += period
            kind["tokens"] += step.num_tokens
    for kind in kinds.values():
        kind["ms_per_step"] = round(kind["seconds"] * 1e3 / kind["steps"], 2)
        kind["seconds"] = round(kind["seconds"], 3)
    return kinds
