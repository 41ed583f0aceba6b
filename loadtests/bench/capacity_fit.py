"""Least squares with non-negative coefficients, small enough to need no numerical library: the
node CPU of each (phase, node) observation as a sum of unit costs times event counts."""

from __future__ import annotations

from collections.abc import Sequence


def solve(matrix: list[list[float]], vector: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when the system is singular."""
    n = len(vector)
    a = [[*row, b] for row, b in zip(matrix, vector, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


def least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float] | None:
    """Minimise |rows . x - targets| by the normal equations."""
    k = len(rows[0])
    normal = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
    right = [sum(r[i] * t for r, t in zip(rows, targets, strict=True)) for i in range(k)]
    return solve(normal, right)


def nonnegative_least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Least squares; a coefficient that comes out negative (noise, or a cost too small to see) is
    fixed at zero and the rest refitted."""
    k = len(rows[0])
    active = list(range(k))
    while active:
        fitted = least_squares([[r[i] for i in active] for r in rows], targets)
        if fitted is None:
            # Columns that never vary cannot be told apart: drop the last one and retry.
            active.pop()
            continue
        negative = [i for i, x in zip(active, fitted, strict=True) if x < 0]
        if not negative:
            out = [0.0] * k
            for i, x in zip(active, fitted, strict=True):
                out[i] = x
            return out
        worst = min(negative, key=lambda i: fitted[active.index(i)])
        active.remove(worst)
    return [0.0] * k
