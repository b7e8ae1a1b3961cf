"""IdentityCache: values of exactly the objects they were made from, bounded."""

from __future__ import annotations

from chronorisk.caching import IdentityCache


class Spec:  # unhashable by value, like a pydantic model
    __hash__ = None  # type: ignore[assignment]


def test_entries_belong_to_the_very_owner_objects_and_their_detail():
    cache = IdentityCache(4)
    a, b = Spec(), Spec()
    assert cache.put((a,), "x", 1) == 1
    assert cache.get((a,), "x") == 1
    assert cache.get((a,), "y") is None
    assert cache.get((b,), "x") is None
    cache.put((a, b), None, "pair")
    assert cache.get((a, b)) == "pair" and cache.get((b, a)) is None


def test_a_reused_id_does_not_return_another_objects_value():
    cache = IdentityCache(4)
    a = Spec()
    cache.put((a,), None, "a's")
    cache._entries[next(iter(cache._entries))] = ((Spec(),), "a's")  # same id key, another owner
    assert cache.get((a,)) is None


def test_the_oldest_entry_goes_when_full():
    cache = IdentityCache(2)
    owners = [Spec() for _ in range(3)]
    for i, o in enumerate(owners):
        cache.put((o,), None, i)
    assert cache.get((owners[0],)) is None
    assert [cache.get((o,)) for o in owners[1:]] == [1, 2]
