"""The NCP data enhancement (paper Section 5; METHOD.md "Data enhancement"): absolute winners.

Per prompt, images are nodes (by uid) and each labelled row is an edge winner -> loser; a tie is a
draw for both images. An *absolute winner* has 0 losses, 0 draws and at least ``min_wins`` wins
(the paper's text: more than one win, ``min_wins=2``; the authors' code: ``wins > 0``). The enhanced
set keeps, for each absolute winner, its pair against its latest loser (``pairs='latest'``), its first
(``'first'``) or all of them (``'all'``). Table 2's variants, with ``y`` the latest loser of absolute
winner ``x`` and ``z`` the latest loser of ``y``: ``x>y``, ``x>y,x>z`` and ``x>y,y>z``.

Everything works on metadata arrays (numpy/arrow, vectorised): no image is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncppo.data.schema import NormalizedPairs
from ncppo.errors import UsageError

PAIR_CHOICES = ("latest", "first", "all")
VARIANTS = ("x>y", "x>y,x>z", "x>y,y>z")


@dataclass
class ComparisonGraph:
    """Per row: prompt id, winner and loser node ids; per node: wins, losses, draws."""

    prompt: np.ndarray
    winner: np.ndarray
    loser: np.ndarray
    is_tie: np.ndarray
    wins: np.ndarray
    losses: np.ndarray
    draws: np.ndarray
    num_prompts: int

    @property
    def num_nodes(self) -> int:
        return len(self.wins)

    def absolute_winners(self, min_wins: int) -> np.ndarray:
        if min_wins < 1:
            raise UsageError(f"min_wins must be >= 1, got {min_wins}")
        return (self.losses == 0) & (self.draws == 0) & (self.wins >= min_wins)


def _codes(array: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Integer codes of a string column and the number of distinct values."""
    encoded = pc.dictionary_encode(array.combine_chunks())
    codes, count = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64), len(encoded.dictionary)
    del encoded
    pa.default_memory_pool().release_unused()  # the combined copy and the hash table: ~100 MB on Pick-a-Pic
    return codes, count


def build_graph(meta: NormalizedPairs) -> ComparisonGraph:
    """Nodes are (prompt, uid): the same uid under two captions counts as two images."""
    n = len(meta)
    prompt, num_prompts = _codes(meta.caption)
    uid, num_uids = _codes(pa.chunked_array(meta.uid_w.chunks + meta.uid_l.chunks, pa.string()))
    prompt2 = np.concatenate([prompt, prompt])
    prompt_of_uid = np.full(num_uids, -1, dtype=np.int64)
    prompt_of_uid[uid] = prompt2
    if np.array_equal(prompt_of_uid[uid], prompt2):
        node = uid  # each uid under one prompt (as in Pick-a-Pic): the uid is the node
    else:
        _, node = np.unique(prompt2 * max(num_uids, 1) + uid, return_inverse=True)
    del prompt2, prompt_of_uid
    winner, loser = node[:n], node[n:]
    num_nodes = int(node.max()) + 1 if n else 0
    decisive = ~meta.is_tie
    count = lambda x: np.bincount(x, minlength=num_nodes)  # noqa: E731
    return ComparisonGraph(
        prompt=prompt, winner=winner, loser=loser, is_tie=meta.is_tie.copy(),
        wins=count(winner[decisive]), losses=count(loser[decisive]),
        draws=count(winner[~decisive]) + count(loser[~decisive]), num_prompts=num_prompts,
    )


def _per_winner(rows: np.ndarray, graph: ComparisonGraph, created_at: np.ndarray, which: str) -> np.ndarray:
    """Of ``rows``, the first or latest (by ``created_at``, then row order) per winner node."""
    if len(rows) == 0:
        return rows
    order = np.lexsort((rows, created_at[rows], graph.winner[rows]))
    sorted_rows = rows[order]
    w = graph.winner[sorted_rows]
    boundary = np.flatnonzero(np.diff(w)) + 1
    if which == "first":
        return sorted_rows[np.concatenate([[0], boundary])]
    return sorted_rows[np.concatenate([boundary - 1, [len(sorted_rows) - 1]])]


@dataclass
class Selection:
    """What to keep: row indices into the metadata, plus synthesised pairs (winner row, loser row)
    whose images come from two rows (Table 2's ``x>z`` when no row compares x and z directly)."""

    rows: np.ndarray
    synthetic: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    details: dict = field(default_factory=dict)


def select_pairs(meta: NormalizedPairs, *, min_wins: int = 2, pairs: str = "latest",
                 variant: str | None = None, graph: ComparisonGraph | None = None) -> Selection:
    """Rows to keep under the absolute-winner rule (see the module docstring). ``meta`` must keep ties;
    pass its ``graph`` when already built."""
    if pairs not in PAIR_CHOICES:
        raise UsageError(f"unknown pair choice {pairs!r}; expected one of {PAIR_CHOICES}")
    if variant is not None and variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant is not None and pairs != "latest":
        raise UsageError("the Table-2 variants use each winner's latest loser; use them with pairs='latest'")
    graph = graph or build_graph(meta)
    absolute = graph.absolute_winners(min_wins)
    decisive_rows = np.flatnonzero(~graph.is_tie)
    candidates = decisive_rows[absolute[graph.winner[decisive_rows]]]
    if variant is None:
        rows = candidates if pairs == "all" else _per_winner(candidates, graph, meta.created_at, pairs)
        return Selection(np.sort(rows), details={"absolute_winners": int(absolute.sum())})

    xy = _per_winner(candidates, graph, meta.created_at, "latest")  # one row per absolute winner x
    latest_win = np.full(graph.num_nodes, -1, dtype=np.int64)
    all_latest = _per_winner(decisive_rows, graph, meta.created_at, "latest")
    latest_win[graph.winner[all_latest]] = all_latest
    yz = latest_win[graph.loser[xy]]  # the row where y beat its latest loser z, or -1
    has_z = yz >= 0
    details = {"absolute_winners": int(absolute.sum()), "winners_with_z": int(has_z.sum()),
               "winners_without_z": int((~has_z).sum())}
    if variant == "x>y":
        return Selection(np.sort(xy), details=details)
    if variant == "x>y,y>z":
        return Selection(np.unique(np.concatenate([xy, yz[has_z]])), details=details)
    # x>y, x>z: a real row where x beat z if there is one, else a pair built from x's and z's rows
    x, z = graph.winner[xy[has_z]], graph.loser[yz[has_z]]
    edge_keys = graph.winner[decisive_rows] * graph.num_nodes + graph.loser[decisive_rows]
    want = x * graph.num_nodes + z
    order = np.argsort(edge_keys, kind="stable")
    pos = np.searchsorted(edge_keys[order], want)
    found = (pos < len(order)) & (edge_keys[order][np.minimum(pos, len(order) - 1)] == want)
    real_xz = decisive_rows[order[pos[found]]]
    synthetic = np.stack([xy[has_z][~found], yz[has_z][~found]], axis=1)
    details.update(xz_from_existing_rows=int(found.sum()), xz_synthesised=int((~found).sum()))
    return Selection(np.unique(np.concatenate([xy, real_xz])), synthetic, details)


def dataset_stats(meta: NormalizedPairs, *, min_wins: int = 2, skipped_rows: int = 0,
                  graph: ComparisonGraph | None = None) -> dict:
    """Rows, pairs, ties, prompts, unique images, images that both win and lose, absolute winners."""
    graph = graph or build_graph(meta)
    return {
        "rows": len(meta) + skipped_rows,
        "valid_rows": len(meta),
        "pairs": int((~meta.is_tie).sum()),
        "ties": int(meta.is_tie.sum()),
        "prompts": graph.num_prompts,
        "prompts_with_pairs": len(np.unique(graph.prompt[~meta.is_tie])),
        "unique_images": graph.num_nodes,
        "images_both_winner_and_loser": int(((graph.wins > 0) & (graph.losses > 0)).sum()),
        "absolute_winners": int(graph.absolute_winners(min_wins).sum()),
        "min_wins": min_wins,
    }
