"""Duplicate detection: a numpy pHash (bit-identical to ``imagehash.phash``), fast Hamming joins, row flags."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from PIL import Image

from gfm_core.data.raster.reader import RasterImage

_HASH_SIZE = 8
_HASH_IMG = 32  # imagehash.phash: hash_size * highfreq_factor(4)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))  # unnormalised DCT-II (scipy.fftpack's default)


_DCT = _dct_matrix(_HASH_IMG)


def perceptual_hash(image: RasterImage) -> int:
    """64-bit pHash of an image (the algorithm of ``imagehash.phash``, in numpy).

    The grey image is the mean of the first ``min(3, C)`` channels (so RGB and BGR orders hash alike), with
    nodata pixels at 0, quantised to 8 bits, resized to 32x32 (Lanczos), 2-D DCT; bit = low-frequency 8x8
    coefficient > their median, packed row-major, most significant bit first (``f"{h:016x}"`` equals
    ``str(imagehash.phash(...))``).
    """
    grey = image.array[: min(3, image.array.shape[0])].mean(axis=0)
    pil = Image.fromarray(np.round(grey * 255.0).astype(np.uint8), mode="L")
    pixels = np.asarray(pil.resize((_HASH_IMG, _HASH_IMG), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:_HASH_SIZE, :_HASH_SIZE]
    bits = (low > np.median(low)).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def phash_hex(h: int) -> str:
    """The 16-digit hex form of a perceptual hash (as ``imagehash`` prints it)."""
    return f"{h:016x}"


def hamming_join(a: np.ndarray, b: np.ndarray, max_d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``(i, j, d)`` with ``popcount(a[i] ^ b[j]) = d <= max_d`` (multi-index hashing).

    Splitting the 64 bits into ``max_d + 1`` pieces, any pair within ``max_d`` bits agrees exactly on at least
    one piece (pigeonhole), so only pairs sharing a piece value are compared.
    """
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    empty = np.empty(0, dtype=np.int64)
    if a.size == 0 or b.size == 0:
        return empty, empty, empty
    pieces = min(max_d + 1, 64)
    widths = [64 // pieces + (1 if i < 64 % pieces else 0) for i in range(pieces)]
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    shift = 0
    for w in widths:
        mask = np.uint64((1 << w) - 1)
        ka = (a >> np.uint64(shift)) & mask
        kb = (b >> np.uint64(shift)) & mask
        shift += w
        oa, ob = np.argsort(ka, kind="stable"), np.argsort(kb, kind="stable")
        kas, kbs = ka[oa], kb[ob]
        keys, starts = cast(tuple[np.ndarray, np.ndarray], np.unique(kas, return_index=True))
        ends = np.append(starts[1:], kas.size)
        lo, hi = np.searchsorted(kbs, keys, "left"), np.searchsorted(kbs, keys, "right")
        for k in np.nonzero(hi > lo)[0]:
            ia, ib = oa[starts[k] : ends[k]], ob[lo[k] : hi[k]]
            step = max(1, (1 << 22) // ib.size)  # bound the block to ~4M comparisons
            for s in range(0, ia.size, step):
                blk = ia[s : s + step]
                r, c = np.nonzero(np.bitwise_count(a[blk, None] ^ b[None, ib]) <= max_d)
                found_i.append(blk[r])
                found_j.append(ib[c])
    if not found_i:
        return empty, empty, empty
    i = np.concatenate(found_i).astype(np.int64)
    j = np.concatenate(found_j).astype(np.int64)
    pair = np.unique(i * b.size + j)
    i, j = pair // b.size, pair % b.size
    d = np.bitwise_count(a[i] ^ b[j]).astype(np.int64)
    return i, j, d


def near_duplicates(hashes: Sequence[int], max_d: int) -> tuple[list[int | None], list[int | None]]:
    """For each index, the smallest earlier index whose hash is within ``max_d`` bits, and that distance."""
    n = len(hashes)
    h = np.asarray(hashes, dtype=np.uint64)
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    # best earlier neighbour among *other* unique hashes, by the first index that carries them
    big = np.iinfo(np.int64).max
    best = np.full(uniq.size, big, dtype=np.int64)
    best_d = np.zeros(uniq.size, dtype=np.int64)
    i, j, d = hamming_join(uniq, uniq, max_d)
    keep = i != j
    i, j, d = i[keep], j[keep], d[keep]
    if i.size:
        cand = first[j]
        order = np.lexsort((d, cand, i))  # per i: smallest first index, then smallest distance
        i, cand, d = i[order], cand[order], d[order]
        head = np.ones(i.size, dtype=bool)
        head[1:] = i[1:] != i[:-1]
        best[i[head]] = cand[head]
        best_d[i[head]] = d[head]
    out: list[int | None] = [None] * n
    dist: list[int | None] = [None] * n
    for idx in range(n):
        u = inverse[idx]
        cands = [(int(best[u]), int(best_d[u]))] if best[u] < idx else []
        if first[u] < idx:
            cands.append((int(first[u]), 0))
        if cands:
            out[idx], dist[idx] = min(cands)
    return out, dist


def flag_near_duplicates(rows: list[dict[str, Any]], max_hamming: int | None) -> int:
    """Fill the ``near_duplicate_*`` columns of manifest ``rows`` (unless ``max_hamming`` is None); returns how many."""
    near = 0
    if max_hamming is not None:
        hashes = [int(r["phash"], 16) for r in rows]
        of, dist = near_duplicates(hashes, max_hamming)
        for r, j, d in zip(rows, of, dist, strict=True):
            r["near_duplicate_of"] = rows[j]["path"] if j is not None else None
            r["near_duplicate_distance"] = d
            near += j is not None
    return near
