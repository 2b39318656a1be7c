"""Counts in messages read as words: 1 job, 2 jobs, 1 box, 3 boxes."""

from __future__ import annotations

import pytest

from producer.text import counted


@pytest.mark.parametrize("n, noun, said", [(1, "job", "1 job"), (2, "job", "2 jobs"), (0, "image", "0 images"),
                                           (1, "box", "1 box"), (3, "box", "3 boxes"),
                                           (2, "failed image", "2 failed images")])
def test_a_count_takes_the_plural_its_noun_needs(n: int, noun: str, said: str) -> None:
    assert counted(n, noun) == said
