"""The two things every stage of a run shares: its wall-clock seconds (for the manifest), and a result cached in
the output folder under a fingerprint of everything it was computed from.

A cached result is reused only when it was made from the same fingerprint *and* reads back as the type the stage
returns (checked field by field by pydantic). Anything else (another fingerprint, an unparseable, empty or
truncated file, missing fields, wrong types, an older layout) is recomputed, with one log line naming the file.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from pydantic import TypeAdapter

from nl_rewrite import io

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StageTimes:
    """Wall-clock seconds per stage, for the manifest."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``, logging its start, its seconds and the peak memory so far (a block that
        raises records nothing: the stage did not finish)."""
        start = time.perf_counter()
        log.info("stage %s ...", name)
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        log.info("stage %s done in %.1fs (peak RSS so far %.2f GB)", name, self.seconds[name], peak_rss_gb())


def peak_rss_gb() -> float:
    """This process's peak resident memory so far: the stage whose line first shows the run's peak set it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def cached(path: Path, fingerprint: str, result_type: object, compute: Callable[[], T]) -> T:
    """The result cached in ``path`` when it was made from ``fingerprint`` and is a valid ``result_type``; else
    ``compute()``, which is then saved there (atomically) with its fingerprint."""
    adapter: TypeAdapter[T] = TypeAdapter(result_type)

    def decode(file: Path) -> T | None:
        data = io.read_json(file)
        if not isinstance(data, dict) or "fingerprint" not in data:
            raise ValueError("not a cached result (no fingerprint)")
        if data["fingerprint"] != fingerprint:  # not damage: the inputs changed
            log.info("%s was computed from other inputs; recomputing it", file)
            return None
        # the layout before this module named the one result key after its content ("results", "info", ...)
        payload = data["result"] if "result" in data else _only_value(data)
        return adapter.validate_python(payload)

    found = io.read_cached(path, decode, "cached result")
    if found is not None:
        return found
    result = compute()
    # python mode, then json.dumps: NaN stays NaN (pydantic's JSON mode would write null, which reads back wrong)
    io.write_json(path, {"fingerprint": fingerprint, "result": adapter.dump_python(result)})
    return result


def _only_value(data: dict) -> object:
    values = [v for k, v in data.items() if k != "fingerprint"]
    if len(values) != 1:
        raise ValueError("not a cached result (no result)")
    return values[0]
