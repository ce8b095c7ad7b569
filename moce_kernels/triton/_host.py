"""Host-side integer helpers for the launch wrappers: plain Python functions with the values of
``triton.cdiv`` and ``triton.next_power_of_2``, which are ``constexpr_function`` objects whose
host calls unwrap every argument (about eight Python calls each instead of one)."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0 (``triton.cdiv``'s value: ``(a + b - 1) // b``)."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, and 0 for n <= 0 (``triton.next_power_of_2``'s
    values)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
