"""The ARL Taylor loss written out by hand, shared by the tests that check the library's version against it."""
from __future__ import annotations


def hand_eq35(p: float, y: float, t: list[float]) -> float:
    """ℓ_θ(p, y) of eq. 3.5 (thesis, ARL) written out: a = p − θ0, b = y − θ1, factorials 1/(i! j!)."""
    a, b = p - t[0], y - t[1]
    return (t[2] * a + t[3] * a**2 / 2 + t[4] * a**3 / 6 + t[5] * a**4 / 24 + t[6] * a * b + t[7] * a * b**2 / 2
            + t[8] * a**2 * b / 2 + t[9] * a**3 * b / 6 + t[10] * a * b**3 / 6 + t[11] * a**2 * b**2 / 4)


def hand_range(t: list[float], classes: int = 10) -> tuple[float, float]:
    """(f_min, f_max) of eq. A.2 over the documented grid: the per-sample loss (1/C)[ℓ(t, 1) + Σ_wrong ℓ(q, 0)]
    (eq. 3.5) at true-class probability t = i/100, the rest 1 − t spread uniformly over the other classes, put on
    one wrong class, or split evenly over two."""
    values = []
    for i in range(101):
        top = i / 100
        rest = 1 - top
        for wrong in ([rest / (classes - 1)] * (classes - 1), [rest] + [0.0] * (classes - 2),
                      [rest / 2, rest / 2] + [0.0] * (classes - 3)):
            values.append((hand_eq35(top, 1.0, t) + sum(hand_eq35(q, 0.0, t) for q in wrong)) / classes)
    return min(values), max(values)
