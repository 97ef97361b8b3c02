"""A sparse cache of one coder's latent activations over a set of token windows, plus per-latent statistics.

Folder layout (everything written through :mod:`nl_rewrite.io`: temp file, fsync, rename)::

    meta.json               identity: coder fingerprint, windows fingerprint, model, shapes
    token_strings.json      the decoded text of every token id (so readers need no tokenizer)
    shards/00000.safetensors  window_ids, positions, latent_ids, values (one row per active latent), tokens
    index/00000.safetensors   the same rows sorted by latent, for a latent range (fast ``activations``)
    stats.safetensors       count, frequency, max, mean, quantiles, sorted empirical sample, n_tokens

Shard ``i`` holds windows ``[i * shard_windows, (i + 1) * shard_windows)``. A build that is killed
leaves finished shards in place; the rerun checks the identity in ``meta.json`` and recomputes only
missing shards. The index and stats are derived from the shards afterwards, one latent range at a time,
so memory stays bounded by ``max_index_rows``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float, Int
from pydantic import TypeAdapter
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite import io
from nl_rewrite.parallel.runner import InProcess, ShardRunner
from nl_rewrite.errors import NLRewriteError
from nl_rewrite.model.loading import model_name
from nl_rewrite.model.capture import capture
from nl_rewrite.model.sites import resolve
from nl_rewrite.hashing import digest

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ROW_FIELDS = ("window_ids", "positions", "latent_ids", "values")
SHARD_WINDOWS = 512
"""Windows per shard (the unit of resumption) unless a build says otherwise."""
SAMPLE_CAP = 256
"""Sorted activation values kept per latent unless a build says otherwise."""


class LatentCacheError(NLRewriteError):
    """A cache folder that is missing, incomplete, or was built for another coder or other windows."""


@dataclass(frozen=True)
class CacheMeta:
    """What a cache folder was built from; a rebuild with different inputs is refused."""

    coder_fingerprint: str
    windows_fingerprint: str
    model: str
    read_site: str
    split: str
    n_latents: int
    n_windows: int
    window: int
    shard_windows: int
    version: int = CACHE_VERSION
    dtype: str = "float32"
    """The model's precision (caches written before it was recorded were float32)."""

    @property
    def n_shards(self) -> int:
        return -(-self.n_windows // self.shard_windows)


@dataclass
class LatentStats:
    """Per-latent statistics over all cached tokens. Dead latents have count 0, max 0 and NaN mean/quantiles."""

    count: Int[Tensor, " n_latents"]
    frequency: Float[Tensor, " n_latents"]
    """Fraction of all tokens on which the latent is active (in the top k with a positive value)."""
    max: Float[Tensor, " n_latents"]
    mean: Float[Tensor, " n_latents"]
    """Mean over the tokens where the latent fires."""
    quantiles: Float[Tensor, "n_latents n_bins_plus_1"]
    """Quantiles 0, 1/n_bins, ..., 1 of the firing values."""
    sample: Float[Tensor, "n_latents sample_cap"]
    """Sorted firing values: all of them if ``count <= sample_cap``, else evenly spaced order statistics. NaN-padded."""
    sample_size: Int[Tensor, " n_latents"]
    n_tokens: int
    """Tokens seen in total: the firing rate is ``count / n_tokens``."""

    def to_tensors(self) -> dict[str, Tensor]:
        out = {k: v for k, v in asdict(self).items() if isinstance(v, Tensor)}
        return {**out, "n_tokens": torch.tensor(self.n_tokens)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "LatentStats":
        return cls(**{**tensors, "n_tokens": int(tensors["n_tokens"])})

    def alive(self) -> Int[Tensor, " n_alive"]:
        return torch.nonzero(self.count > 0).flatten()


# ---- identities ----------------------------------------------------------------------------------------------

def coder_fingerprint(coder) -> str:
    """Hash of the coder's config and weights: a retrained coder with the same config is a different coder."""
    weights = [part for name, tensor in sorted(coder.state_dict().items())
               for part in (name, tensor.detach().float().contiguous().cpu().numpy().tobytes())]
    return digest(json.dumps(coder.cfg.to_dict(), sort_keys=True), *weights)




def _read_meta(path: Path) -> CacheMeta:
    data = io.read_json(path)
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:  # pydantic would fill a missing one
        raise ValueError(f"layout version {data.get('version') if isinstance(data, dict) else None}, "
                         f"not {CACHE_VERSION}")
    return TypeAdapter(CacheMeta).validate_python(data)


def _check_meta(folder: Path, meta: CacheMeta) -> None:
    """Write meta.json for a new folder; refuse a folder built from something else. A folder without a readable
    meta.json of this layout cannot vouch for what it holds: everything in it is removed and rebuilt."""
    path = folder / "meta.json"
    found = io.read_cached(path, _read_meta, "latent cache identity")
    if found is None:
        stale = [item for item in (folder / name for name in ("shards", "index", "stats.safetensors",
                                                               "token_strings.json"))
                 if item.is_file() or (item.is_dir() and any(item.iterdir()))]
        if stale and not path.exists():
            log.warning("latent cache %s has files but no meta.json; rebuilding it", folder)
        for item in stale:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
        (folder / "shards").mkdir(exist_ok=True)
        io.write_json(path, asdict(meta))
        return
    have = asdict(found)
    diffs = {k: (have.get(k), v) for k, v in asdict(meta).items() if have.get(k) != v}
    if diffs:
        detail = "; ".join(f"{k}: folder has {a!r}, this build has {b!r}" for k, (a, b) in diffs.items())
        raise LatentCacheError(f"latent cache {folder} was built from different inputs ({detail}). "
                               "Use another folder, or delete this one to rebuild.")


# ---- building ------------------------------------------------------------------------------------------------

@torch.no_grad()
def _encode_batch(model, coder, hook: str, tokens: Int[Tensor, "b pos"]
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows (window offset in batch, position, latent id, value) of the positive TopK latents."""
    latents = coder.encode(capture(model, tokens, [hook])[hook].float())
    keep = latents.values > 0  # TopK can pick zeros when fewer than k latents fire: those are not activations
    batch_idx, pos, slot = torch.nonzero(keep, as_tuple=True)
    return batch_idx, pos, latents.indices[batch_idx, pos, slot], latents.values[batch_idx, pos, slot]


def _build_shard(model, coder, windows: TokenWindows, start: int, stop: int, batch_size: int) -> dict[str, Tensor]:
    hook = resolve(model, coder.cfg.read_site)
    parts: list[tuple[Tensor, ...]] = []
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        b, pos, lat, val = _encode_batch(model, coder, hook, windows.tokens[lo:hi])
        parts.append((b + lo, pos, lat, val))
    cols = [torch.cat([p[i] for p in parts]) for i in range(4)]
    dtypes = (torch.int32, torch.int32, torch.int32, torch.float32)
    rows = {name: col.to(device="cpu", dtype=dtype) for name, col, dtype in zip(ROW_FIELDS, cols, dtypes)}  # saved
    return {**rows, "tokens": windows.tokens[start:stop].to(torch.int32)}


@dataclass(frozen=True)
class ShardInputs:
    """What a worker needs to encode shards: sent once to each worker of a runner."""

    model: object
    coder: object
    windows: TokenWindows
    batch_size: int


def encode_span(inputs: ShardInputs, span: tuple[int, int]) -> dict[str, Tensor]:
    """The rows of windows ``[start, stop)``: one shard's tensors."""
    return _build_shard(inputs.model, inputs.coder, inputs.windows, span[0], span[1], inputs.batch_size)


def _token_strings(model) -> list[str]:
    tok = model.tokenizer
    return [tok.decode([i]) for i in range(len(tok))]


# ---- index and statistics (derived from the shards) -----------------------------------------------------------

def _rows_in_range(shard_paths: list[Path], lo: int, hi: int) -> dict[str, Tensor]:
    """All rows whose latent id lies in [lo, hi), sorted by (latent, window, position)."""
    parts: list[dict[str, Tensor]] = []
    for path in shard_paths:
        shard = _read(path)
        mask = (shard["latent_ids"] >= lo) & (shard["latent_ids"] < hi)
        parts.append({k: shard[k][mask] for k in ROW_FIELDS})
    rows = {k: torch.cat([p[k] for p in parts]) for k in ROW_FIELDS}
    # shards are read in window order and rows within a shard are in (window, position) order, so a stable
    # sort by latent keeps each latent's rows in (window, position) order
    order = torch.sort(rows["latent_ids"], stable=True).indices
    return {k: v[order] for k, v in rows.items()}


def _range_stats(rows: dict[str, Tensor], lo: int, hi: int, n_bins: int, sample_cap: int) -> dict[str, Tensor]:
    n = hi - lo
    local = rows["latent_ids"].long() - lo
    values = rows["values"]
    count = torch.bincount(local, minlength=n)
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, local, values.double())
    maxes = torch.zeros(n).scatter_reduce_(0, local, values, reduce="amax", include_self=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)])
    quantiles = torch.full((n, n_bins + 1), float("nan"))
    sample = torch.full((n, sample_cap), float("nan"))
    probs = torch.linspace(0, 1, n_bins + 1)
    for i in torch.nonzero(count).flatten().tolist():
        vals = values[offsets[i]:offsets[i + 1]].sort().values  # rows are sorted by window, not value
        quantiles[i] = torch.quantile(vals, probs)
        take = _even_ranks(len(vals), sample_cap)
        sample[i, :len(take)] = vals[take]
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.tensor(float("nan"), dtype=torch.float64))
    return {"count": count, "max": maxes, "mean": mean.float(), "quantiles": quantiles, "sample": sample,
            "sample_size": torch.clamp(count, max=sample_cap), "offsets": offsets}


def _even_ranks(n: int, cap: int) -> Tensor:
    """All ranks if n <= cap, else ``cap`` evenly spaced ranks from the smallest to the largest."""
    if n <= cap:
        return torch.arange(n)
    return torch.linspace(0, n - 1, cap).round().long()


# ---- the cache -----------------------------------------------------------------------------------------------

class LatentCache:
    """Read access to a built cache folder. Build one with :meth:`build`, open one with :meth:`open`."""

    def __init__(self, folder: Path, meta: CacheMeta, stats: LatentStats, latent_ranges: list[tuple[int, int]]):
        self.folder = folder
        self.meta = meta
        self.stats = stats
        self._ranges = latent_ranges
        self._offsets = [_read(self._index_path(i))["offsets"] for i in range(len(latent_ranges))]
        self._token_strings: list[str] | None = None
        self._loaded: dict[int, dict[str, Tensor]] = {}
        self.shards_built = 0
        """How many shards the last :meth:`build` call computed (0 when everything was already there)."""

    # -- building --
    @classmethod
    def build(cls, model, coder, windows: TokenWindows, folder: "str | Path", *, shard_windows: int = SHARD_WINDOWS,
              batch_size: int = 16, n_bins: int = 10, sample_cap: int = SAMPLE_CAP, max_index_rows: int = 20_000_000,
              progress: bool = True, runner: ShardRunner | None = None) -> "LatentCache":
        """Encode every window and store the sparse activations; resumes a killed build of the same inputs.

        Memory: one shard of rows while encoding; at most ``max_index_rows`` rows while indexing. ``runner``
        (default: this process) computes the missing shards; this process writes each one as it arrives.
        """
        if shard_windows < 1 or batch_size < 1 or n_bins < 1 or sample_cap < 1:
            raise ValueError("shard_windows, batch_size, n_bins and sample_cap must all be >= 1")
        coder.check_fits(model)
        folder = Path(folder)
        (folder / "shards").mkdir(parents=True, exist_ok=True)
        meta = CacheMeta(coder_fingerprint(coder), windows.fingerprint(), model_name(model), coder.cfg.read_site,
                         windows.split, coder.cfg.n_latents, len(windows), windows.window, shard_windows,
                         dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
        _check_meta(folder, meta)
        if io.read_cached(folder / "token_strings.json", _read_token_strings, "latent cache token strings") is None:
            io.write_json(folder / "token_strings.json", _token_strings(model))
        built = cls._build_shards(ShardInputs(model, coder, windows, batch_size), folder, meta,
                                  runner or InProcess(), progress)
        if built or not _index_intact(folder):
            cls._build_index(folder, meta, n_bins, sample_cap, max_index_rows, progress)
        cache = cls.open(folder)
        cache.shards_built = built
        return cache

    @staticmethod
    def _build_shards(inputs: "ShardInputs", folder: Path, meta: CacheMeta, runner: ShardRunner, progress: bool
                      ) -> int:
        todo = [i for i in range(meta.n_shards) if not _readable(_shard_path(folder, i))]
        if todo:
            log.info("latent cache %s: %d of %d shards to compute", folder, len(todo), meta.n_shards)
            _remove(folder / "stats.safetensors")  # stale once shards change
        inputs.coder.eval()
        spans = [(i * meta.shard_windows, min((i + 1) * meta.shard_windows, meta.n_windows)) for i in todo]
        runner.map(inputs, encode_span, spans,
                   lambda index, rows: io.save_tensors(_shard_path(folder, todo[index]), rows),
                   desc="latent cache shards", progress=progress)
        return len(todo)

    @staticmethod
    def _build_index(folder: Path, meta: CacheMeta, n_bins: int, sample_cap: int, max_index_rows: int,
                     progress: bool) -> None:
        shard_paths = [_shard_path(folder, i) for i in range(meta.n_shards)]
        ranges = _latent_ranges(shard_paths, meta.n_latents, max_index_rows)
        (folder / "index").mkdir(exist_ok=True)
        per_range = []
        for r, (lo, hi) in enumerate(tqdm(ranges, desc="latent index", disable=not progress)):
            rows = _rows_in_range(shard_paths, lo, hi)
            stats = _range_stats(rows, lo, hi, n_bins, sample_cap)
            index = {k: rows[k] for k in ("window_ids", "positions", "values")}
            io.save_tensors(folder / "index" / f"{r:05d}.safetensors", {**index, "offsets": stats.pop("offsets")})
            per_range.append(stats)
        n_tokens = meta.n_windows * meta.window
        merged = {k: torch.cat([s[k] for s in per_range]) for k in per_range[0]}
        merged["frequency"] = merged["count"].double().div(n_tokens).float()
        merged["n_tokens"] = torch.tensor(n_tokens)
        merged["ranges"] = torch.tensor(ranges, dtype=torch.long)
        io.save_tensors(folder / "stats.safetensors", merged)

    # -- reading --
    @classmethod
    def open(cls, folder: "str | Path") -> "LatentCache":
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise LatentCacheError(f"{folder} is not a latent cache (no meta.json); build it with `nl-rewrite cache`")
        try:
            meta = _read_meta(folder / "meta.json")
        except Exception as exc:  # unparseable, missing fields, wrong types
            raise LatentCacheError(f"latent cache identity {folder / 'meta.json'} cannot be read ({type(exc).__name__}); "
                                   "rerun the build (`nl-rewrite cache` or the run): it rebuilds the folder") from exc
        if not (folder / "stats.safetensors").is_file():
            raise LatentCacheError(f"latent cache {folder} is incomplete (no stats.safetensors); rerun the build "
                                   "to resume it")
        tensors = _read(folder / "stats.safetensors")
        ranges = [tuple(r) for r in tensors.pop("ranges").tolist()]
        return cls(folder, meta, LatentStats.from_tensors(tensors), ranges)  # type: ignore[arg-type]

    def __reduce__(self):
        """Pickled as its folder: a worker that receives a cache reopens it (no tensors cross the wire)."""
        return (open_cache, (self.folder.resolve(),))  # workers may run in another directory

    def _index_path(self, r: int) -> Path:
        return self.folder / "index" / f"{r:05d}.safetensors"

    @property
    def n_latents(self) -> int:
        return self.meta.n_latents

    def __len__(self) -> int:
        return self.meta.n_windows

    def activations(self, latent: int) -> tuple[Int[Tensor, " m"], Int[Tensor, " m"], Float[Tensor, " m"]]:
        """(window_ids, positions, values) of every token where ``latent`` fires, sorted by window then position."""
        if not 0 <= latent < self.n_latents:
            raise IndexError(f"latent {latent} out of range [0, {self.n_latents})")
        r = next(i for i, (lo, hi) in enumerate(self._ranges) if lo <= latent < hi)
        local = latent - self._ranges[r][0]
        a, b = int(self._offsets[r][local]), int(self._offsets[r][local + 1])
        with safe_open(str(self._index_path(r)), framework="pt") as fh:
            out = [fh.get_slice(k)[a:b] for k in ("window_ids", "positions", "values")]
        return out[0].long(), out[1].long(), out[2]

    def _shard(self, i: int) -> dict[str, Tensor]:
        if i not in self._loaded:
            if len(self._loaded) >= 4:  # keep a few shards: readers go window by window, mostly in order
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[i] = _read(_shard_path(self.folder, i))
        return self._loaded[i]

    def rows(self, window_ids: "Sequence[int] | None" = None) -> dict[str, Tensor]:
        """All active (window, position, latent, value) rows, optionally only of ``window_ids``."""
        wanted = None if window_ids is None else torch.zeros(self.meta.n_windows, dtype=torch.bool)
        if wanted is not None:
            wanted[torch.as_tensor(list(window_ids), dtype=torch.long)] = True
        parts = []
        for i in range(self.meta.n_shards):
            shard = self._shard(i)
            mask = wanted[shard["window_ids"].long()] if wanted is not None else slice(None)
            parts.append({k: shard[k][mask] for k in ROW_FIELDS})
        return {k: torch.cat([p[k] for p in parts]) for k in ROW_FIELDS}

    def dense_windows(self, window_ids: "Sequence[int]") -> Float[Tensor, "n pos n_latents"]:
        """``dense_window`` of many windows at once (one pass over the rows)."""
        ids = torch.as_tensor(list(window_ids), dtype=torch.long)
        slot = torch.full((self.meta.n_windows,), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(ids))
        rows = self.rows(window_ids)
        dense = torch.zeros(len(ids), self.meta.window, self.n_latents)
        dense[slot[rows["window_ids"].long()], rows["positions"].long(), rows["latent_ids"].long()] = rows["values"]
        return dense

    def dense_window(self, window_id: int) -> Float[Tensor, "pos n_latents"]:
        """All latent activations of one window as a dense matrix (zeros where a latent is not active)."""
        shard = self._shard(self._shard_of(window_id))
        mask = shard["window_ids"] == window_id
        dense = torch.zeros(self.meta.window, self.n_latents)
        dense[shard["positions"][mask].long(), shard["latent_ids"][mask].long()] = shard["values"][mask]
        return dense

    def window_tokens(self, window_id: int) -> list[int]:
        shard_i = self._shard_of(window_id)
        return self._shard(shard_i)["tokens"][window_id - shard_i * self.meta.shard_windows].tolist()

    def _shard_of(self, window_id: int) -> int:
        if not 0 <= window_id < self.meta.n_windows:
            raise IndexError(f"window {window_id} out of range [0, {self.meta.n_windows})")
        return window_id // self.meta.shard_windows

    @property
    def tokens(self) -> Int[Tensor, "n_windows window"]:
        """All window tokens (loaded shard by shard)."""
        return torch.cat([self._shard(i)["tokens"] for i in range(self.meta.n_shards)]).long()

    def token_strings(self, ids: "list[int]") -> list[str]:
        """The decoded text of each token id (stored at build time, so no tokenizer is needed)."""
        if self._token_strings is None:
            path = self.folder / "token_strings.json"
            try:
                self._token_strings = _read_token_strings(path)
            except Exception as exc:
                raise LatentCacheError(f"latent cache file {path} cannot be read ({type(exc).__name__}); rerun the "
                                       "build (`nl-rewrite cache` or the run): it rewrites the file") from exc
        return [self._token_strings[i] for i in ids]


def open_cache(folder: "str | Path") -> LatentCache:
    """:meth:`LatentCache.open` as a module-level function, which pickles by name."""
    return LatentCache.open(folder)


def _read_token_strings(path: Path) -> list[str]:
    return TypeAdapter(list[str]).validate_python(io.read_json(path))


def _shard_path(folder: Path, i: int) -> Path:
    return folder / "shards" / f"{i:05d}.safetensors"


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Tensor]:
    """A cache file's tensors; a corrupt or truncated file is a ``LatentCacheError`` naming it and the fix."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise LatentCacheError(f"latent cache file {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                               "rerun the build (`nl-rewrite cache` or the run): it recomputes unreadable shards "
                               "and the index derived from them") from exc


def _readable(path: Path) -> bool:
    """Whether a cache file exists and its header and length are whole (safetensors checks that the data the
    header declares is all there: a truncated file fails); a bad one is logged and will be rebuilt."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
        return True
    except Exception as exc:
        log.warning("latent cache file %s is unreadable (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return False


def _index_intact(folder: Path) -> bool:
    """Whether the derived statistics and every index file are there and readable."""
    stats = folder / "stats.safetensors"
    if not _readable(stats):
        return False
    with safe_open(str(stats), framework="pt") as fh:
        ranges = fh.get_tensor("ranges")
    return all(_readable(folder / "index" / f"{r:05d}.safetensors") for r in range(len(ranges)))


def _latent_ranges(shard_paths: list[Path], n_latents: int, max_rows: int) -> list[tuple[int, int]]:
    """Split latent ids into contiguous ranges whose rows fit ``max_rows`` (a single latent may exceed it)."""
    counts = torch.zeros(n_latents, dtype=torch.long)
    for path in shard_paths:
        with safe_open(str(path), framework="pt") as fh:
            counts += torch.bincount(fh.get_tensor("latent_ids").long(), minlength=n_latents)
    ranges, lo, acc = [], 0, 0
    for latent, c in enumerate(counts.tolist()):
        if acc + c > max_rows and latent > lo:
            ranges.append((lo, latent))
            lo, acc = latent, 0
        acc += c
    ranges.append((lo, n_latents))
    return ranges
